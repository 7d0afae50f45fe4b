//! The OpenAPI description at `/api/v1/openapi.json`, checked against the live admin
//! API by schemathesis (PyPI; `.ci/run` installs it): every answer must be documented
//! (status, content type, headers, schema) and none may be a 5xx.

mod common;

use std::process::Command;

use common::*;
use http::StatusCode;

const TOKEN: &str = "openapi-test-token";

/// Paths of the contract (docs/admin-api.md) that the description must hold.
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/"),
    ("get", "/api/v1/state"),
    ("get", "/api/v1/info"),
    ("get", "/api/v1/traffic"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/services/{service}/switch"),
    ("put", "/api/v1/services/{service}/canary"),
    ("delete", "/api/v1/services/{service}/canary"),
    ("post", "/api/v1/services/{service}/promote"),
    ("post", "/api/v1/services/{service}/rollback"),
    ("get", "/api/v1/services/{service}/history"),
    ("post", "/api/v1/services/{service}/rollout"),
    ("get", "/api/v1/services/{service}/rollout"),
    ("post", "/api/v1/services/{service}/rollout/pause"),
    ("post", "/api/v1/services/{service}/rollout/resume"),
    ("post", "/api/v1/services/{service}/rollout/abort"),
    ("put", "/api/v1/services/{service}/mirror"),
    ("delete", "/api/v1/services/{service}/mirror"),
    ("get", "/api/v1/pools/{pool}"),
    ("post", "/api/v1/pools/{pool}/backends/{addr}/drain"),
    ("post", "/api/v1/pools/{pool}/backends/{addr}/disable"),
    ("post", "/api/v1/pools/{pool}/backends/{addr}/enable"),
    ("get", "/api/v1/pools/{pool}/backends/{addr}/wait-drained"),
    ("put", "/api/v1/pools/{pool}/backends"),
    ("post", "/api/v1/pools/{pool}/backends"),
    ("delete", "/api/v1/pools/{pool}/backends/{addr}"),
    ("get", "/api/v1/tls"),
    ("post", "/api/v1/tls/reload"),
    ("post", "/api/v1/config/reload"),
    ("post", "/api/v1/upgrade"),
    ("get", "/api/v1/cluster"),
    ("get", "/api/v1/cluster/converged"),
];

struct Fixture {
    proxy: ProxyProcess,
    blue: Upstream,
    _green: Upstream,
    spec: serde_json::Value,
}

async fn fixture() -> Fixture {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = state_dir();
    let ca = common::tls::TestCa::new("openapi test CA");
    let pair = ca.issue(&["localhost"]).write(&dir, "localhost");
    let config = config_with_admin(
        // An HTTPS listener, so the certificate endpoints answer more than 404.
        &common::tls::tls_table(&[pair], ""),
        &admin_token_keys(TOKEN),
        &[("blue", &[blue.addr]), ("green", &[green.addr])],
        "[pools.blue.health]\npath = \"/health\"\ninterval = \"1s\"\n",
    );
    let proxy = ProxyProcess::start(&config);
    wait_ready(proxy.admin_addr).await;
    let auth = format!("Bearer {TOKEN}");
    let (status, spec) = admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/openapi.json",
        None,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{spec}");
    Fixture {
        proxy,
        blue,
        _green: green,
        spec,
    }
}

#[tokio::test]
async fn the_description_holds_every_path_of_the_contract() {
    let f = fixture().await;
    assert_eq!(f.spec["openapi"], "3.1.0");
    for (method, path) in CONTRACT {
        assert!(
            f.spec["paths"][path][method].is_object(),
            "{} {path} is not in the OpenAPI description",
            method.to_uppercase()
        );
    }
    // Every change documents its conditional form and its errors.
    let switch = &f.spec["paths"]["/api/v1/services/{service}/switch"]["post"];
    let parameters = switch["parameters"].as_array().unwrap();
    assert!(parameters.iter().any(|p| p["name"] == "If-Match"));
    for status in ["200", "400", "401", "404", "409", "413", "503"] {
        assert!(switch["responses"][status].is_object(), "switch: {status}");
    }
    assert!(switch["responses"]["200"]["headers"]["ETag"].is_object());
    assert!(f.spec["components"]["securitySchemes"]["bearer"].is_object());
    // Without the token the description, like the rest of the API, is not shown.
    let (status, _) = admin(f.proxy.admin_addr, "GET", "/api/v1/openapi.json", None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// One schemathesis run against the live API; panics with its report on any failure.
fn schemathesis(f: &Fixture, name: &str, config: &str, selection: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("openapi.json");
    std::fs::write(&spec_path, f.spec.to_string()).unwrap();
    let config_path = dir.path().join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();
    let output = Command::new("schemathesis")
        .arg("--config-file")
        .arg(&config_path)
        .arg("run")
        .arg(&spec_path)
        .args(["--url", &format!("http://{}", f.proxy.admin_addr)])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        // Every check but one: `positive_data_acceptance` expects a 2xx for any value
        // the schema allows, and this API answers 400 to values no schema can rule out
        // (an empty pool name, a timeout over 10m, a pool with no healthy backend).
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "40", "--request-timeout", "20"])
        .args(["--no-color", "--report-dir"])
        .arg(dir.path())
        .args(selection)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache of crashes goes where it runs: not into the repository.
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("schemathesis could not run ({e}): `pip install schemathesis` (.ci/run does)")
        });
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis ({name}) found answers the description does not allow:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("Tested:"), "{report}");
}

#[tokio::test]
async fn schemathesis_finds_no_undocumented_answer_and_no_server_error() {
    let f = fixture().await;
    let addr = f.blue.addr.to_string();
    // Real names, so the fuzzing reaches the handlers' logic and not only 404s.
    let real_names = format!(
        "[parameters]\n\"path.service\" = \"app\"\n\"path.pool\" = \"blue\"\n\"path.addr\" = \"{addr}\"\n"
    );
    schemathesis(
        &f,
        "everything but membership writes",
        &real_names,
        &[
            // An upgrade replaces the process under test.
            "--exclude-path",
            "/api/v1/upgrade",
            // Random backend lists, and a rollout's gate URLs, could name addresses off
            // this machine; those run below against a pool and a service that do not
            // exist, so they are refused before anything is reached.
            "--exclude-path-regex",
            "^/api/v1/pools/\\{pool\\}/backends$|^/api/v1/services/\\{service\\}/rollout$",
        ],
    );
    schemathesis(
        &f,
        "membership writes and rollout starts",
        "[parameters]\n\"path.pool\" = \"no-such-pool\"\n\"path.service\" = \"no-such-service\"\n",
        &[
            "--include-path-regex",
            "^/api/v1/pools/\\{pool\\}/backends$|^/api/v1/services/\\{service\\}/rollout$",
        ],
    );
    // The API still answers after the fuzzing, and the process is alive.
    let (status, _) = admin(f.proxy.admin_addr, "GET", "/readyz", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
}
