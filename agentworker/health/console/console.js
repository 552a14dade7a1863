// The agentworker operator console: vanilla JavaScript (fetch and DOM calls), no framework, no build step.
//
// Decisions:
// - Every value is written with textContent (the el() helper below makes text nodes): tenant ids, job
//   results, errors and workflow inputs are tenant-controlled strings; nothing is ever parsed as HTML.
// - The token lives in sessionStorage (gone with the tab) and is sent as the bearer of every request;
//   the page itself holds no data.
// - It polls every POLL_MS; a section is rebuilt only when its data changed, so a comment being typed or
//   a button being clicked is not swept away by a refresh. One poll at a time.
// - Views are chosen by the URL's hash: "" the overview, "#job=ID", "#tenant=ID", "#tenant=ID&run=RUN".
"use strict";

(function () {
  const POLL_MS = 2000;
  const TOKEN_KEY = "agentworker.token";
  const OPERATOR_KEY = "agentworker.operator";
  //: tenants whose recent failures the overview shows, at most, and how often it asks again for each: each
  //: ask reads up to 500 stream entries in Redis, so not every poll
  const MAX_TENANT_FAILURE_FETCHES = 10;
  const FAILURES_EVERY_MS = 10000;

  const view = document.getElementById("view");
  const auth = document.getElementById("auth");
  const message = document.getElementById("message");
  const refreshed = document.getElementById("refreshed");
  const built = new WeakMap(); // section element -> the JSON it was last built from
  const failureCache = new Map(); // tenant id -> {at, events}
  let polling = false;
  let lastHash = null;

  // -- DOM helpers -------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "testid") node.dataset.testid = value;
      else if (key === "class") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function cell(value, attrs) {
    return el("td", attrs, value === null || value === undefined || value === "" ? "-" : value);
  }

  function state(value) {
    const text = value === null || value === undefined ? "-" : String(value);
    return el("span", { class: "state " + text.replace(/[^a-z_]/g, ""), testid: "state" }, text);
  }

  function table(testid, headers, rows, empty) {
    if (!rows.length) return el("p", { class: "muted", testid: testid + "-empty" }, empty || "none");
    return el("table", { testid: testid },
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows));
  }

  function section(id, title) {
    let node = document.getElementById(id);
    if (!node) {
      node = el("section", { id: id, testid: id });
      view.append(node);
    }
    node.dataset.title = title;
    return node;
  }

  // Rebuild a section only when its data changed.
  function fill(node, data, build) {
    const key = JSON.stringify(data);
    if (built.get(node) === key) return;
    built.set(node, key);
    node.replaceChildren(el("h2", {}, node.dataset.title), ...[].concat(build(data)));
  }

  function pretty(value) {
    return el("pre", {}, typeof value === "string" ? value : JSON.stringify(value, null, 2));
  }

  function seconds(value) {
    if (typeof value !== "number") return "-";
    if (value < 60) return value.toFixed(value < 10 ? 1 : 0) + "s";
    if (value < 3600) return Math.floor(value / 60) + "m " + Math.floor(value % 60) + "s";
    return Math.floor(value / 3600) + "h " + Math.floor((value % 3600) / 60) + "m";
  }

  function when(unix) {
    return typeof unix === "number" ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 23) : "-";
  }

  function megabytes(bytes) {
    return typeof bytes === "number" ? (bytes / 1048576).toFixed(0) + " MB" : "-";
  }

  function jobLink(jobId) {
    return el("a", { href: "#job=" + encodeURIComponent(jobId), testid: "job-link" }, jobId);
  }

  function tenantLink(tenantId) {
    return el("a", { href: "#tenant=" + encodeURIComponent(tenantId), testid: "tenant-link" }, tenantId);
  }

  function errorText(error) {
    if (!error) return null;
    if (typeof error === "string") return error;
    return [error.error, error.message].filter(Boolean).join(": ") || JSON.stringify(error);
  }

  // -- HTTP --------------------------------------------------------------------------------------------

  function headers(extra) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const all = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) all.Authorization = "Bearer " + token;
    return all;
  }

  class Refused extends Error {
    constructor(status, sentence) {
      super(sentence);
      this.status = status;
    }
  }

  async function answer(response) {
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
    if (!response.ok) {
      const sentence = body && body.error
        ? body.error + (body.errors && body.errors.length ? " (" + body.errors.join("; ") + ")" : "")
        : (text.trim() || response.statusText || "request failed");
      throw new Refused(response.status, sentence);
    }
    return body;
  }

  async function getJson(path) {
    return answer(await fetch(path, { headers: headers(), cache: "no-store" }));
  }

  async function postJson(path, body) {
    return answer(await fetch(path, {
      method: "POST", cache: "no-store", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body || {}),
    }));
  }

  function operator() {
    return sessionStorage.getItem(OPERATOR_KEY) || "console";
  }

  function say(text, isError) {
    message.hidden = false;
    message.className = "banner" + (isError ? " error" : "");
    message.textContent = text;
  }

  async function act(what, path, body) {
    try {
      const result = await postJson(path, body);
      say(what + ": " + summary(result), false);
      poll(true);
      return result;
    } catch (error) {
      const status = error instanceof Refused ? " (HTTP " + error.status + ")" : "";
      say(what + " refused" + status + ": " + error.message, true);
      return null;
    }
  }

  function summary(result) {
    if (!result) return "done";
    if (result.status && result.job_id) {
      return "job " + result.job_id + " is " + result.status + (result.cancel_requested ? " (cancel requested)" : "");
    }
    if (result.job_id) return "job " + result.job_id + " enqueued" + (result.created === false ? " (already was)" : "");
    if ("ok" in result) {
      return result.ok ? "applied" + (result.changes ? " " + JSON.stringify(result.changes) : "")
                       : "refused: " + (result.errors || []).join("; ");
    }
    return JSON.stringify(result);
  }

  // -- the overview ------------------------------------------------------------------------------------

  async function overview() {
    const status = await getJson("status");
    const tenants = Object.keys(status.tenants || {}).slice(0, MAX_TENANT_FAILURE_FETCHES);
    const [dead, ...failures] = await Promise.all([
      getJson("status/dead-letters?limit=20").catch((e) => ({ _error: e.message })),
      ...tenants.map((t) => recentFailures(t)),
    ]);
    const failuresOf = {};
    tenants.forEach((t, i) => { failuresOf[t] = failures[i]; });
    return () => renderOverview(status, dead, failuresOf);
  }

  function renderOverview(status, dead, failuresOf) {
    fill(section("supervisor", "Supervisor"), status.supervisor || {}, (s) => el("div", { class: "grid" },
      el("div", {}, el("span", {}, "state"), state(s.state)),
      el("div", {}, el("span", {}, "pid"), String(s.pid)),
      el("div", {}, el("span", {}, "uptime"), seconds(s.uptime_s)),
      el("div", {}, el("span", {}, "redis"), state(s.redis_ok ? "ok" : "failing")),
      el("div", {}, el("span", {}, "config version"), String(s.config_version)),
      el("div", {}, el("span", {}, "last reload"),
        s.last_reload ? (s.last_reload.ok ? "ok" : "refused") + " (" + s.last_reload.trigger + ")" : "-")));

    const pools = status.pools || {};
    fill(section("pools", "Pools"), { pools: pools, dead: status.dead_letters || {} }, (d) => table("pools-table",
      ["pool", "status", "serving", "processes", "shards", "concurrency", "job timeout", "memory limit",
       "restarts", "dead letters", "reason"],
      Object.entries(d.pools).map(([name, p]) => el("tr", { testid: "pool-row", "data-pool": name },
        cell(name), el("td", {}, state(p.status)), cell(p.serving, { class: "num" }),
        cell(p.processes, { class: "num" }), cell(p.shards, { class: "num" }),
        cell(p.concurrency, { class: "num" }), cell(p.job_timeout === undefined ? null : p.job_timeout + "s"),
        cell(p.memory_limit_mb === undefined ? null : p.memory_limit_mb + " MB"),
        cell(p.restarts, { class: "num" }), cell(d.dead[name], { class: "num" }), cell(p.reason)))));

    fill(section("processes", "Processes"), { rows: status.processes || [], pools: pools }, (d) =>
      table("processes-table",
        ["pool", "slot", "role", "pid", "state", "uptime", "memory (RSS / limit)", "jobs", "running", "restarts",
         "backoff", "last exit"],
        d.rows.map((p) => {
          const limitMb = (d.pools[p.pool] || {}).memory_limit_mb;
          const rss = typeof p.rss_bytes === "number" ? p.rss_bytes : null;
          const memory = el("td", {});
          if (rss !== null && limitMb) {
            memory.append(el("meter", { min: 0, max: limitMb * 1048576, high: limitMb * 1048576 * 0.8,
                                        value: rss }), " ");
          }
          memory.append(megabytes(rss) + (limitMb ? " / " + limitMb + " MB" : ""));
          const last = p.last_exit ? p.last_exit.reason + ": " + p.last_exit.description : null;
          return el("tr", { testid: "process-row", "data-pool": p.pool, "data-slot": p.slot },
            cell(p.pool), cell(p.slot, { class: "num" }), cell(p.role), cell(p.pid, { class: "num" }),
            el("td", {}, state(p.state)), cell(seconds(p.uptime_s)), memory,
            cell(p.jobs_served, { class: "num" }), cell(p.running, { class: "num" }),
            cell(p.restarts, { class: "num" }),
            cell(p.next_start_in_s ? "next start in " + seconds(p.next_start_in_s)
              : (p.backoff_s ? seconds(p.backoff_s) : null)),
            cell(last));
        }), "no worker process"));

    const queueRows = [];
    for (const [pool, shards] of Object.entries(status.queues || {})) {
      for (const [shard, q] of Object.entries(shards)) queueRows.push([pool, shard, q]);
    }
    fill(section("queues", "Queues"), queueRows, (rows) => table("queues-table",
      ["pool", "shard", "runnable", "due", "deferred", "total"],
      rows.map(([pool, shard, q]) => el("tr", { testid: "queue-row" },
        cell(pool), cell(shard, { class: "num" }), cell(q.runnable, { class: "num" }), cell(q.ready, { class: "num" }),
        cell(q.deferred !== undefined ? q.deferred : q.total - q.ready, { class: "num" }),
        cell(q.total, { class: "num" }))), "no queue observed yet"));

    fill(section("tenants", "Tenants"), { tenants: status.tenants || {}, failures: failuresOf }, (d) =>
      table("tenants-table",
        ["tenant", "in flight", "max concurrency", "pending", "max pending", "rate limit", "recent failures"],
        Object.entries(d.tenants).map(([tenant, t]) => {
          const recent = d.failures[tenant] || [];
          return el("tr", { testid: "tenant-row", "data-tenant": tenant },
            el("td", {}, tenantLink(tenant)), cell(t.in_flight, { class: "num" }),
            cell(t.max_concurrency, { class: "num" }), cell(t.pending, { class: "num" }),
            cell(t.max_pending, { class: "num" }), cell(t.rate_limit),
            el("td", {}, recent.length ? recent.map((e) => el("div", {}, jobLink(e.data.job_id || ""), " ",
              errorText({ error: e.data.error, message: e.data.message }) || e.event)) : "-"));
        }), "no tenant with jobs in flight or pending"));

    fill(section("dead-letters", "Dead letters"), dead, (d) => {
      if (d._error) return el("p", { class: "error" }, d._error);
      const rows = [];
      for (const [pool, found] of Object.entries(d)) {
        for (const letter of found.letters) {
          rows.push(el("tr", { testid: "dead-letter-row" }, cell(pool), cell(letter.id), cell(letter.reason),
            cell(letter.detail), cell(letter.queue), cell(when(letter.ts / 1000))));
        }
        if (found.more) rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted" },
          found.more + " more in " + pool + ": agentworker dead-letters list --pool " + pool)));
      }
      return table("dead-letters-table", ["pool", "id", "reason", "detail", "queue", "moved at"], rows,
        "no dead letter");
    });
  }

  async function recentFailures(tenantId) {
    const cached = failureCache.get(tenantId);
    if (cached && Date.now() - cached.at < FAILURES_EVERY_MS) return cached.events;
    const events = await getJson("status/tenants/" + encodeURIComponent(tenantId) + "/failures?limit=3")
      .catch(() => (cached ? cached.events : []));
    failureCache.set(tenantId, { at: Date.now(), events: events });
    if (failureCache.size > 1000) failureCache.clear();
    return events;
  }

  // -- a job -------------------------------------------------------------------------------------------

  async function jobPage(jobId) {
    let job;
    try {
      job = await getJson("status/jobs/" + encodeURIComponent(jobId));
    } catch (error) {
      if (!(error instanceof Refused) || error.status === 401) throw error;
      job = { job_id: jobId, status: "not_found", refusal: error.message, events: [] };
    }
    return () => renderJob(jobId, job);
  }

  function renderJob(jobId, job) {    fill(section("job", "Job " + jobId), job, (j) => {
      const parts = [
        el("div", { class: "grid" },
          el("div", {}, el("span", {}, "status"), el("b", { testid: "job-status" }, j.status)),
          el("div", {}, el("span", {}, "tenant"), j.tenant_id ? tenantLink(j.tenant_id) : "-"),
          el("div", {}, el("span", {}, "task"), j.task || "-"),
          el("div", {}, el("span", {}, "queue"), j.queue || "-"),
          el("div", {}, el("span", {}, "tries"), el("span", { testid: "job-tries" }, String(j.tries || 0))),
          el("div", {}, el("span", {}, "enqueued"), when(j.enqueued_at)),
          el("div", {}, el("span", {}, "started"), when(j.started_at)),
          el("div", {}, el("span", {}, "finished"), when(j.finished_at)),
          el("div", {}, el("span", {}, "cancel requested"),
            el("span", { testid: "job-cancel-requested" }, j.cancel_requested ? "yes" : "no"))),
        el("div", { class: "actions" },
          el("button", { class: "danger", testid: "job-cancel", type: "button",
                         disabled: !["queued", "deferred", "running"].includes(j.status) || j.cancel_requested,
                         onclick: () => act("Cancel", "admin/jobs/" + encodeURIComponent(jobId) + "/cancel",
                                            { by: operator() }) }, "Cancel"),
          el("button", { testid: "job-retry", type: "button", disabled: !["failed", "cancelled"].includes(j.status),
                         onclick: () => act("Retry", "admin/jobs/" + encodeURIComponent(jobId) + "/retry",
                                            { by: operator() }) }, "Retry")),
      ];
      if (j.refusal) parts.push(el("p", { class: "error", testid: "job-refusal" }, j.refusal));
      if (j.error) {
        parts.push(el("h3", {}, "Error"), el("pre", { testid: "job-error" }, errorText(j.error)));
      }
      if (j.result !== null && j.result !== undefined) {
        parts.push(el("h3", {}, "Result"), el("div", { testid: "job-result" }, pretty(j.result)));
      }
      parts.push(el("h3", {}, "Events"), table("job-events", ["stream id", "time", "event", "data"],
        (j.events || []).map((e) => el("tr", { testid: "job-event-row" }, cell(e.id), cell(e.ts), cell(e.event),
          el("td", {}, pretty(e.data)))), "no event of this job among its tenant's latest"));
      return parts;
    });
  }

  // -- a tenant ----------------------------------------------------------------------------------------

  async function tenantPage(tenantId, runId) {
    const base = "status/tenants/" + encodeURIComponent(tenantId);
    const [runs, schedules, failures, run] = await Promise.all([
      getJson(base + "/runs?limit=50").catch(keep),
      getJson(base + "/schedules").catch(keep),
      getJson(base + "/failures?limit=20").catch(keep),
      runId ? getJson(base + "/runs/" + encodeURIComponent(runId)).catch(keep) : Promise.resolve(null),
    ]);
    return () => renderTenant(tenantId, runId, runs, schedules, failures, run);
  }

  function renderTenant(tenantId, runId, runs, schedules, failures, run) {
    if (runId) {
      fill(section("run", "Run " + runId), run, (r) => runDetail(tenantId, r));
    }
    fill(section("runs", "Workflow runs of " + tenantId), runs, (list) => refusedOr(list, () =>
      table("runs-table", ["run", "workflow", "status", "trigger", "attempts", "created", "finished", "job"],
        list.map((r) => el("tr", { testid: "run-row", "data-run": r.run_id },
          el("td", {}, el("a", { href: "#tenant=" + encodeURIComponent(tenantId) + "&run=" + encodeURIComponent(r.run_id),
                                 testid: "run-link" }, r.run_id)),
          cell(r.workflow_id), el("td", {}, state(r.status)), cell(r.trigger), cell(r.attempts, { class: "num" }),
          cell(r.created_at), cell(r.finished_at), el("td", {}, r.job_id ? jobLink(r.job_id) : "-"))),
        "no workflow run")));
    fill(section("failures", "Recent failures"), failures, (list) => refusedOr(list, () =>
      table("failures-table", ["time", "event", "job", "error"],
        list.map((e) => el("tr", { testid: "failure-row" }, cell(e.ts), cell(e.event),
          el("td", {}, e.data.job_id ? jobLink(e.data.job_id) : "-"),
          cell(errorText({ error: e.data.error, message: e.data.message }) || e.data.reason))),
        "no failed job among the tenant's latest events")));
    fill(section("schedules", "Schedules"), schedules, (d) => refusedOr(d, () =>
      table("schedules-table", ["id", "kind", "enabled", "next due", "last run", "last job", "runs", "failures",
                                "last error"],
        d.schedules.map((s) => el("tr", { testid: "schedule-row" }, cell(s.id), cell(s.kind),
          cell(s.enabled ? "yes" : "no"), cell(s.next_due_at), cell(s.last_due_at),
          el("td", {}, s.last_job_id ? jobLink(s.last_job_id) : "-"), cell(s.dispatched_count, { class: "num" }),
          cell(s.failures, { class: "num" }), cell(s.last_error))), "no schedule")));
  }

  function keep(error) {
    if (error instanceof Refused && error.status === 401) throw error;
    return { _error: error.message };
  }

  function refusedOr(data, build) {
    return data && data._error ? el("p", { class: "error", testid: "refusal" }, data._error) : build();
  }

  function runDetail(tenantId, r) {
    if (!r) return el("p", { class: "muted" }, "loading");
    if (r._error) return el("p", { class: "error", testid: "refusal" }, r._error);
    const path = "admin/tenants/" + encodeURIComponent(tenantId) + "/runs/" + encodeURIComponent(r.run_id) + "/decision";
    const waiting = (r.approvals || []).filter((a) => a.status === "pending");
    const parts = [
      el("div", { class: "grid" },
        el("div", {}, el("span", {}, "status"), el("b", { testid: "run-status" }, r.status)),
        el("div", {}, el("span", {}, "workflow"), r.workflow_id + " v" + r.workflow_version),
        el("div", {}, el("span", {}, "attempts"), String(r.attempts)),
        el("div", {}, el("span", {}, "created"), r.created_at || "-"),
        el("div", {}, el("span", {}, "finished"), r.finished_at || "-"),
        el("div", {}, el("span", {}, "job"), r.job_id ? jobLink(r.job_id) : "-")),
      el("h3", {}, "Approvals waiting"),
    ];
    if (!waiting.length) parts.push(el("p", { class: "muted", testid: "approvals-empty" }, "none"));
    for (const approval of waiting) {
      const comment = el("input", { type: "text", size: 30, maxlength: 2000, placeholder: "comment (optional)",
                                    testid: "approval-comment-" + approval.step_id });
      const decide = (decision) => () => act(decision === "approve" ? "Approve" : "Reject", path, {
        decision: decision, by: operator(), step_id: approval.step_id, comment: comment.value || null });
      parts.push(el("div", { class: "actions", testid: "approval", "data-step": approval.step_id },
        el("b", {}, approval.step_id), pretty(approval.request), comment,
        el("button", { class: "primary", type: "button", testid: "approve-" + approval.step_id,
                       onclick: decide("approve") }, "Approve"),
        el("button", { class: "danger", type: "button", testid: "reject-" + approval.step_id,
                       onclick: decide("reject") }, "Reject")));
    }
    parts.push(el("h3", {}, "Step trail"), table("run-steps", ["step", "kind", "attempt", "status", "started",
                                                              "finished", "output or error"],
      (r.steps || []).map((s) => el("tr", { testid: "step-row", "data-step": s.step_id },
        cell(s.step_id), cell(s.kind), cell(s.attempt, { class: "num" }), el("td", {}, state(s.status)),
        cell(s.started_at), cell(s.finished_at),
        el("td", {}, s.error ? pretty(s.error) : (s.output !== null && s.output !== undefined ? pretty(s.output) : "-")))),
      "no step has started"));
    if (r.error) parts.push(el("h3", {}, "Error"), el("pre", { testid: "run-error" }, errorText(r.error)));
    if (r.output !== null && r.output !== undefined) parts.push(el("h3", {}, "Output"), pretty(r.output));
    return parts;
  }

  // -- the loop ----------------------------------------------------------------------------------------

  function route() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return { job: params.get("job"), tenant: params.get("tenant"), run: params.get("run") };
  }

  async function poll(force) {
    if (polling && !force) return;
    polling = true;
    const hash = location.hash;
    if (hash !== lastHash) {
      view.replaceChildren();
      lastHash = hash;
    }
    try {
      const where = route();
      // Fetch first, then draw only if the operator is still on the same page (a slow answer for the
      // page just left must not draw its sections on the new one).
      const render = where.job ? await jobPage(where.job)
        : where.tenant ? await tenantPage(where.tenant, where.run) : await overview();
      if (location.hash !== hash) return;
      view.dataset.page = where.job ? "job" : where.tenant ? "tenant" : "overview";
      render();
      auth.hidden = true;
      refreshed.textContent = "updated " + new Date().toLocaleTimeString();
      refreshed.dataset.ok = "1";
    } catch (error) {
      if (error instanceof Refused && error.status === 401) {
        auth.hidden = false;
        auth.textContent = "The supervisor wants a token: type AGENTWORKER_STATUS_TOKEN (to read) or the admin " +
                           "token (to read and act) in the token box. (" + error.message + ")";
      } else {
        refreshed.textContent = "refresh failed: " + error.message;
      }
      refreshed.dataset.ok = "0";
    } finally {
      polling = false;
    }
  }

  function start() {
    const tokenInput = document.getElementById("token");
    const operatorInput = document.getElementById("operator");
    tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
    operatorInput.value = sessionStorage.getItem(OPERATOR_KEY) || "";
    document.getElementById("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (tokenInput.value) sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
      else sessionStorage.removeItem(TOKEN_KEY);
      if (operatorInput.value.trim()) sessionStorage.setItem(OPERATOR_KEY, operatorInput.value.trim());
      else sessionStorage.removeItem(OPERATOR_KEY);
      say("Token and name saved for this tab.", false);
      poll(true);
    });
    document.getElementById("goto-job").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = document.getElementById("job-id").value.trim();
      if (id) location.hash = "job=" + encodeURIComponent(id);
    });
    document.getElementById("goto-tenant").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = document.getElementById("tenant-id").value.trim();
      if (id) location.hash = "tenant=" + encodeURIComponent(id);
    });
    document.getElementById("reload").addEventListener("click", () => act("Reload", "admin/reload"));
    window.addEventListener("hashchange", () => { message.hidden = true; poll(true); });
    poll(true);
    setInterval(poll, POLL_MS);
  }

  start();
}());
