// kronlink dashboard: polls state.json, redraws the jobs table, swaps in the
// server-rendered versions section when it changes, and activates versions.
// Plain browser JavaScript, no build step, no library. Data from the server
// goes into the page through textContent only; the one innerHTML is the
// server's own escaped fragment.
"use strict";

(function () {
  const body = document.body;
  const cfg = {
    lineage: body.dataset.lineage,
    stateUrl: body.dataset.stateUrl,
    fragmentUrl: body.dataset.fragmentUrl,
    activateUrl: body.dataset.activateUrl,
    pollMs: parseInt(body.dataset.pollMs, 10) || 2000,
  };
  let fingerprint = body.dataset.fingerprint;
  // Tokens live in sessionStorage (this tab only) and travel in a header, never a cookie.
  const TOKEN_KEY = "kronlink.adminToken";
  const READ_KEY = "kronlink.readToken";

  function readHeaders() {
    const t = sessionStorage.getItem(READ_KEY);
    return t ? { "Authorization": "Bearer " + t } : {};
  }

  function $(id) { return document.getElementById(id); }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function fixed(x, n) { return x === null || x === undefined ? "" : Number(x).toFixed(n); }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text === null || text === undefined ? "" : String(text);
    tr.appendChild(td);
    return td;
  }

  function jobRow(j) {
    const tr = document.createElement("tr");
    tr.className = "job state-" + j.state.replace(/[^a-z_]/g, "");
    tr.dataset.jobId = j.id;
    cell(tr, "#" + j.id);
    cell(tr, j.lineage);
    cell(tr, j.task);
    cell(tr, j.method);
    const st = cell(tr, "");
    const badge = document.createElement("span");
    badge.className = "badge " + tr.className.split(" ")[1];
    badge.textContent = j.state + (j.cancel_requested && j.state === "running" ? " (cancelling)" : "");
    st.appendChild(badge);
    cell(tr, j.phase, "phase");
    const p = cell(tr, "", "progress");
    if (j.fraction !== null && j.total_steps) {
      const bar = document.createElement("progress");
      bar.max = j.total_steps;
      bar.value = j.step;
      p.appendChild(bar);
      const steps = document.createElement("span");
      steps.className = "steps";
      steps.textContent = " " + j.step + "/" + j.total_steps;
      p.appendChild(steps);
    }
    cell(tr, j.epoch);
    cell(tr, fixed(j.loss, 4));
    cell(tr, fixed(j.dev_accuracy, 3));
    cell(tr, j.error || j.message, "message");
    cell(tr, fmtTime(j.started_at));
    cell(tr, fmtTime(j.finished_at));
    cell(tr, fmtDuration(j.duration_s), "duration");
    return tr;
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "";
    if (s < 10) return s.toFixed(1) + " s";
    const r = Math.round(s);
    if (r < 60) return r + " s";
    const m = Math.floor(r / 60);
    if (m < 60) return m + " min " + String(r % 60).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function pct(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(1) + " %"; }
  function ms(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(1) + " ms"; }

  function replicaRow(r) {
    const tr = document.createElement("tr");
    tr.className = "replica";
    tr.dataset.replica = r.id;
    cell(tr, r.id);
    const serves = Object.entries(r.serving || {}).map(
      ([name, num]) => name + ": " + (num === null ? "none loaded" : "v" + num));
    cell(tr, serves.join(", "));
    cell(tr, r.requests_per_s === null ? "—" : Number(r.requests_per_s).toFixed(1), "rate");
    cell(tr, pct(r.error_rate), "errors");
    cell(tr, pct(r.refused_rate));
    cell(tr, ms(r.link_p50_ms));
    cell(tr, ms(r.link_p99_ms));
    cell(tr, r.requests_total === null ? "—" : String(r.requests_total));
    cell(tr, fmtTime(r.started_at));
    cell(tr, fmtTime(r.seen_at));
    return tr;
  }

  function renderReplicas(replicas) {
    const tbody = $("serving-body");
    if (!tbody || !replicas) return;
    const rows = replicas.map(replicaRow);
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell(tr, "no replica has reported yet");
      td.colSpan = 10;
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function renderJobs(jobs) {
    const tbody = $("jobs-body");
    const rows = jobs.map(jobRow);
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell(tr, "no jobs yet");
      td.colSpan = 14;
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  async function refreshLineage(lineage) {
    const url = cfg.fragmentUrl + "?lineage=" + encodeURIComponent(lineage);
    const res = await fetch(url, { cache: "no-store", credentials: "omit", headers: readHeaders() });
    if (!res.ok) throw new Error("fragment: HTTP " + res.status);
    $("lineage-section").innerHTML = await res.text(); // server-rendered, escaped
  }

  class Locked extends Error {}

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    const status = $("poll-status");
    try {
      const q = cfg.lineage ? "?lineage=" + encodeURIComponent(cfg.lineage) : "";
      const res = await fetch(cfg.stateUrl + q, {
        cache: "no-store", credentials: "omit", headers: readHeaders(),
      });
      if (res.status === 401) throw new Locked("read token needed");
      if (!res.ok) throw new Error("HTTP " + res.status);
      const s = await res.json();
      if (!cfg.lineage && s.lineage) { // a first version appeared, or the page was locked
        cfg.lineage = s.lineage;
        history.replaceState(null, "", "?lineage=" + encodeURIComponent(s.lineage));
      }
      renderJobs(s.jobs);
      renderReplicas(s.replicas);
      if (s.fingerprint !== fingerprint) {
        await refreshLineage(cfg.lineage);
        fingerprint = s.fingerprint;
      }
      $("unlock-form").hidden = true;
      $("updated-at").textContent = fmtTime(s.generated_at);
      status.textContent = "live";
      status.className = "ok";
    } catch (err) {
      if (err instanceof Locked) { // wait for the token: no point polling without it
        const had = sessionStorage.getItem(READ_KEY);
        sessionStorage.removeItem(READ_KEY);
        $("unlock-error").textContent = had ? "That token was refused." : "";
        $("unlock-form").hidden = false;
        status.textContent = "locked";
        status.className = "bad";
        return;
      }
      status.textContent = "offline (" + err.message + ")";
      status.className = "bad";
    }
    timer = setTimeout(poll, cfg.pollMs);
  }

  $("unlock-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("read-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(READ_KEY, token);
    $("unlock-error").textContent = "";
    poll();
  });

  // -- activate / roll back ------------------------------------------------
  const dialog = $("activate-dialog");
  let target = null;

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = bad ? "bad shown" : "ok shown";
    setTimeout(() => { t.className = ""; }, 6000);
  }

  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.activate");
    if (!btn) return;
    target = { id: btn.dataset.versionId, number: btn.dataset.version, lineage: btn.dataset.lineage };
    const active = btn.dataset.active;
    const rollback = active && Number(target.number) < Number(active);
    $("activate-title").textContent = (rollback ? "Roll back to v" : "Activate v") + target.number;
    $("activate-text").textContent =
      "Make v" + target.number + " the active version of lineage “" + target.lineage + "”" +
      (active ? " (now v" + active + ")" : "") +
      "? Every API replica loads it and switches within seconds; requests in flight finish on the old model.";
    $("activate-confirm").textContent = rollback ? "Roll back" : "Activate";
    // The tasks the active version keeps and the target does not: a rollback forgets them.
    const forgets = (btn.dataset.forgets || "").split(", ").filter(Boolean);
    const warning = $("activate-warning");
    warning.textContent = forgets.length
      ? "Rolling back to v" + target.number + " forgets " + forgets.join(", ") +
        ": /v1/link answers for " + (forgets.length > 1 ? "those tasks" : "that task") +
        " come from a model that never learned " + (forgets.length > 1 ? "them" : "it") + "."
      : "";
    warning.hidden = !forgets.length;
    $("activate-reason").value = "";
    $("activate-error").textContent = "";
    const saved = sessionStorage.getItem(TOKEN_KEY);
    $("admin-token").value = saved || "";
    $("remember-token").checked = !!saved;
    dialog.showModal();
    $("admin-token").focus();
  });

  $("activate-cancel").addEventListener("click", () => dialog.close());

  $("activate-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!target) return;
    const token = $("admin-token").value.trim();
    if (!token) { $("activate-error").textContent = "The admin token is required."; return; }
    const reason = $("activate-reason").value.trim();
    if (!reason) { $("activate-error").textContent = "Say why: the reason is kept in the audit log."; return; }
    const by = $("activate-by").value.trim();
    if ($("remember-token").checked) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    const confirmBtn = $("activate-confirm");
    confirmBtn.disabled = true;
    try {
      const res = await fetch(cfg.activateUrl.replace("{id}", encodeURIComponent(target.id)), {
        method: "POST",
        credentials: "omit",
        headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
        body: JSON.stringify(by ? { reason: reason, by: by } : { reason: reason }),
      });
      if (!res.ok) {
        let detail = "HTTP " + res.status;
        try {
          const p = await res.json(); // RFC 9457 problem
          detail = [p.title, p.detail].filter(Boolean).join(": ") || detail;
        } catch (_) { /* not JSON */ }
        $("activate-error").textContent = detail;
        return;
      }
      dialog.close();
      toast("v" + target.number + " is now active", false);
      await poll();
    } catch (err) {
      $("activate-error").textContent = "Request failed: " + err.message;
    } finally {
      confirmBtn.disabled = false;
    }
  });

  if (body.dataset.locked && sessionStorage.getItem(READ_KEY)) poll();
  else if (!body.dataset.locked) timer = setTimeout(poll, cfg.pollMs);
})();
