//! The OpenAPI 3 description of the admin API, made from the handlers' own
//! annotations as the router is built (see `app`), so it cannot drift from them.

use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::Modify;

/// The parts of the description that are not a handler's: title, token, tags.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "switchyard admin API",
        description = "Traffic control, health and drain, membership, reload and upgrade of a switchyard instance. Every change answers the new view with its generation as `ETag`; send it back as `If-Match` to change only what you saw. Every error is `{\"error\", \"code\"}`. See docs/admin-api.md.",
    ),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    tags(
        (name = "traffic", description = "Services: where their traffic goes"),
        (name = "rollouts", description = "Step canaries judged and moved by the proxy, and mirroring"),
        (name = "pools", description = "Pools and their backends"),
        (name = "process", description = "This process: info, certificates, reload, upgrade"),
        (name = "cluster", description = "The fleet (`[cluster]`)"),
        (name = "probes", description = "Liveness, readiness, metrics and the status page"),
    )
)]
pub(super) struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`[admin] token_file`: needed by every /api/v1 call when configured",
                    ))
                    .build(),
            ),
        );
    }
}

/// `?wait=converged`, which any change takes.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum WaitFor {
    Converged,
}

/// The query every change takes (read by `change::convergence`, not by the handler's
/// own parameters).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct ChangeQuery {
    /// `converged`: with `[cluster]`, answer once every live member applied the change
    /// (504 naming the laggards otherwise; the change stands).
    #[param(inline)]
    wait: Option<WaitFor>,
    /// How long `wait=converged` waits, e.g. `10s` (the default).
    timeout: Option<String>,
}
