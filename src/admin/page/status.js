// The status page: polls the admin API and draws what it answers. Read-only, no
// dependencies, nothing fetched from anywhere but this listener. Every value is put in
// with textContent, never as HTML: names and check errors come from configs and
// upstreams.
"use strict";

const REFRESH_MS = 2000;
// A request that hangs (the process stopped, packets dropped) must not freeze the page.
const REQUEST_TIMEOUT_MS = 5000;
const TOKEN_KEY = "switchyard-token";

class Unauthorized extends Error {}

let token = sessionStorage.getItem(TOKEN_KEY);
let lastSuccess = 0;
let timer = null;
let refreshing = false;
let again = false;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, used) {
  const headers = used ? { Authorization: "Bearer " + used } : {};
  const response = await fetch(path, {
    headers, cache: "no-store", signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(path + ": " + (body.error || response.status + " " + response.statusText));
  }
  return response.json();
}

function showLogin(message) {
  // Without the token nothing of the state stays on the page.
  $("dashboard").hidden = true;
  for (const id of ["pools", "process"]) $(id).replaceChildren();
  $("services").tBodies[0].replaceChildren();
  $("cluster").tBodies[0].replaceChildren();
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
}

function percent(fraction) {
  if (fraction === undefined || fraction === null) return "–";
  return (fraction * 100).toFixed(fraction < 0.01 && fraction > 0 ? 2 : 1) + "%";
}

function millis(seconds) {
  if (seconds === undefined || seconds === null) return "–";
  return seconds < 1 ? (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + " ms" : seconds.toFixed(2) + " s";
}

function rate(perSecond) {
  return perSecond >= 100 ? perSecond.toFixed(0) : perSecond.toFixed(1);
}

const SVG = "http://www.w3.org/2000/svg";

function sparkline(values, width, height) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const known = values.map((v) => (v === undefined || v === null ? 0 : v));
  if (known.length > 1) {
    const max = Math.max(...known) || 1;
    const step = width / (known.length - 1);
    const points = known.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  return svg;
}

function chart(kind, label, points, pick, format) {
  const values = points.map(pick);
  const latest = values.length ? values[values.length - 1] : undefined;
  return el("div", { class: "chart " + kind, "data-chart": kind },
    el("span", { class: "muted" }, label),
    el("span", { class: "value" }, format(latest)),
    sparkline(values, 180, 36));
}

function canaryText(canary) {
  if (!canary) return null;
  const parts = [`${canary.pool} ${canary.weight}%`];
  if (canary.header) parts.push(`header ${canary.header.name}=${canary.header.value}`);
  if (canary.cookie) parts.push(`cookie ${canary.cookie.name}=${canary.cookie.value}`);
  if (canary.sticky) parts.push(`sticky on ${canary.sticky}`);
  return parts.join(", ");
}

function rolloutText(rollout) {
  if (!rollout) return null;
  return `${rollout.pool} ${rollout.status.replace("_", " ")}, step ${rollout.step}/${rollout.steps}`;
}

function renderServices(services) {
  const rows = services.map((s) =>
    el("tr", { "data-service": s.name },
      el("td", {}, s.name),
      el("td", { class: "addr" }, (s.hosts.length ? s.hosts.join(" ") : "*") + " " + s.path_prefix),
      el("td", { "data-field": "active" }, s.active),
      el("td", { class: "muted" }, s.previous_active || "–"),
      el("td", { "data-field": "canary", class: s.canary ? "canary" : "muted" }, canaryText(s.canary) || "–"),
      el("td", { class: "muted" }, s.preview ? `${s.preview.header}: ${s.preview.pools.join(", ")}` : "–"),
      el("td", { "data-field": "rollout", class: s.rollout ? "rollout " + s.rollout.status : "muted", title: (s.rollout && s.rollout.reason) || "" },
        rolloutText(s.rollout) || "–"),
      el("td", { "data-field": "mirror", class: s.mirror ? "" : "muted" }, s.mirror ? `${s.mirror.pool} ${s.mirror.percent}%` : "–")));
  $("services").tBodies[0].replaceChildren(...rows);
}

function roleOf(pool, services) {
  const roles = [];
  for (const s of services) {
    if (s.active === pool) roles.push(`active for ${s.name}`);
    if (s.canary && s.canary.pool === pool) roles.push(`canary ${s.canary.weight}% for ${s.name}`);
  }
  return roles.join(", ") || "idle";
}

function renderPools(pools, services, traffic) {
  const cards = pools.map((pool) => {
    const points = (traffic.pools && traffic.pools[pool.name]) || [];
    const rows = pool.backends.map((b) =>
      el("tr", {
        "data-backend": `${pool.name}/${b.addr}`,
        "data-health": b.health,
        "data-state": b.state,
        class: `health-${b.health} state-${b.state}`,
      },
        el("td", { class: "addr" }, b.addr),
        el("td", {},
          el("span", { class: "badge health" }, b.health),
          b.last_check_error ? el("div", { class: "muted", "data-field": "reason" }, b.last_check_error) : null),
        el("td", {}, el("span", { class: "badge state" }, b.state), b.ejected ? " " : null,
          b.ejected ? el("span", { class: "badge ejected" }, "ejected") : null),
        el("td", {}, b.weight),
        el("td", { "data-field": "in_flight" }, b.in_flight),
        el("td", { class: "muted" }, b.checks)));
    return el("div", { class: "pool", "data-pool": pool.name },
      el("h3", {}, pool.name, el("span", { class: "muted" }, roleOf(pool.name, services))),
      el("div", { class: "charts" },
        chart("rate", "requests/s", points, (p) => p.requests_per_second, (v) => (v === undefined ? "–" : rate(v))),
        chart("errors", "error rate", points, (p) => p.error_rate, percent),
        chart("p99", "p99", points, (p) => p.p99_seconds, millis)),
      el("table", {},
        el("thead", {}, el("tr", {}, ...["Backend", "Health", "State", "Weight", "In flight", "Checks"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  });
  $("pools").replaceChildren(...cards);
}

function renderCluster(cluster) {
  $("cluster-section").hidden = !cluster;
  if (!cluster) return;
  const rows = cluster.members.map((m) =>
    el("tr", { "data-member": m.name },
      el("td", {}, m.name + (m.name === cluster.name ? " (this one)" : "")),
      el("td", { class: "addr" }, m.admin),
      el("td", {}, m.generation),
      el("td", {}, m.version),
      el("td", { class: "muted" }, m.last_seen)));
  $("cluster").tBodies[0].replaceChildren(...rows);
}

function renderProcess(info) {
  const cluster = info.cluster ? ` · fleet ${info.cluster.connected ? "connected" : "etcd unreachable"}` : "";
  $("process").replaceChildren(
    el("span", {}, `v${info.version} · pid ${info.pid} · `),
    el("span", { id: "generation" }, `generation ${info.generation}`),
    el("span", {}, cluster));
}

function freshness() {
  const age = lastSuccess ? Math.round((Date.now() - lastSuccess) / 1000) : null;
  $("freshness").textContent = age === null ? "" : age <= 3 ? "live" : `updated ${age}s ago`;
}

async function refresh() {
  if (refreshing) {
    // A submit while a round is out: run again with the new token once it is back.
    again = true;
    return;
  }
  refreshing = true;
  clearTimeout(timer);
  const used = token;
  let polling = true;
  try {
    const [state, info, traffic] = await Promise.all([
      api("/api/v1/state", used), api("/api/v1/info", used), api("/api/v1/traffic", used),
    ]);
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("problem").hidden = true;
    renderProcess(info);
    renderServices(state.services);
    renderPools(state.pools, state.services, traffic);
    renderCluster(info.cluster);
    lastSuccess = Date.now();
  } catch (error) {
    if (error instanceof Unauthorized) {
      if (used === token) {
        // Refused: forget it, and wait for the next one typed rather than poll.
        sessionStorage.removeItem(TOKEN_KEY);
        token = null;
        lastSuccess = 0;
        showLogin(used ? "That token was refused." : "");
        polling = false;
      }
    } else {
      // Keep the last picture, marked stale by the age shown next to it.
      $("problem").hidden = false;
      $("problem").textContent = "The admin API did not answer: " + error.message;
    }
  }
  refreshing = false;
  freshness();
  if (again) {
    again = false;
    refresh();
  } else if (polling) {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    $("login-error").hidden = true;
    refresh();
  });
  // The age of the picture keeps counting even while a request is out.
  setInterval(freshness, 1000);
  refresh();
});
