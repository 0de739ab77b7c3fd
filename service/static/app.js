/* motionguard web page: upload, poll, show the result. No framework, no external requests.
 *
 * The API key (optional) lives only in the password field: it is sent as an Authorization header
 * on every request and is never stored nor put in a URL. Videos and pictures that need the key are
 * fetched with the header and shown through blob: URLs.
 */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form");
  const fileInput = $("file");
  const submitButton = $("submit");
  const cancelButton = $("cancel");
  const statusEl = $("status");
  const errorEl = $("error");
  const resultEl = $("result");

  const POLL_MIN_MS = 300;
  const POLL_MAX_MS = 2000;
  const TERMINAL = new Set(["finished", "failed", "canceled", "stopped"]);

  // What a status code means for the person using the page; the server's own message follows it.
  const STATUS_HELP = {
    400: "The request was not understood.",
    401: "An API key is required, or the key entered is wrong. Enter a valid key in the API key field.",
    403: "This API key is not allowed to do that.",
    404: "Not found: the job does not exist, has expired, or belongs to another API key.",
    409: "Conflict with an earlier request.",
    413: "The file is too large for this server.",
    415: "The file is not a video the server can read.",
    422: "A parameter or the uploaded file was rejected.",
    429: "Too many of your jobs are still running. Wait for one to finish and try again.",
    500: "The server hit an internal error.",
    502: "The server is unreachable right now.",
    503: "The service is busy or unavailable right now.",
    504: "The server took too long to answer.",
  };

  let current = null; // {jobId, key, statusUrl, timer, objectUrls[], canceled}
  let originalUrl = null;

  function authHeaders(key) {
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function apiUrl(path) {
    // Relative to the page so the service also works behind a path prefix.
    return new URL(path.replace(/^\//, ""), document.baseURI).toString();
  }

  function serverUrl(url, fallback) {
    // URLs the server hands out (status_url, restored_url, flow_url, ...): absolute paths are the
    // service's own; anything else falls back to the path we know.
    if (typeof url === "string" && url.startsWith("/")) {
      return new URL(url, window.location.origin).toString();
    }
    return apiUrl(fallback);
  }

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  async function apiError(response) {
    let code = "http_" + response.status;
    let message = response.statusText || "";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      } else if (body && body.detail) {
        message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (_) {
      /* not JSON: keep the status text */
    }
    return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
  }

  async function request(path, key, options) {
    let response;
    try {
      response = await fetch(path, {
        ...(options || {}),
        headers: { ...authHeaders(key), ...((options && options.headers) || {}) },
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch (err) {
      throw new ApiError(0, "network", "Could not reach the server (" + err.message + ").", null);
    }
    if (!response.ok) throw await apiError(response);
    return response;
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return "Unexpected error: " + (err && err.message ? err.message : err);
    if (err.status === 0) return err.message;
    let text = "Error " + err.status + (STATUS_HELP[err.status] ? ": " + STATUS_HELP[err.status] : "");
    if (err.message) text += " Server says: " + err.message + (err.code ? " (" + err.code + ")" : "");
    if (err.retryAfter) text += " Retry after " + err.retryAfter + " s.";
    return text;
  }

  function setStatus(text) {
    statusEl.textContent = text;
  }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = false;
  }

  function clearError() {
    errorEl.textContent = "";
    errorEl.hidden = true;
  }

  function setBusy(busy) {
    submitButton.disabled = busy;
    cancelButton.hidden = !busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function stopCurrent() {
    if (!current) return;
    current.canceled = true;
    if (current.timer) clearTimeout(current.timer);
    for (const url of current.objectUrls) URL.revokeObjectURL(url);
    current = null;
  }

  function fmt(value, digits) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "n/a";
  }

  function pct(score) {
    return typeof score === "number" ? (score * 100).toFixed(1) + " %" : "n/a";
  }

  // ---- submit -------------------------------------------------------------------------------

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const file = fileInput.files && fileInput.files[0];
    if (!file) {
      showError("Choose a video file first.");
      fileInput.focus();
      return;
    }
    const steps = $("steps").value.trim();
    if (steps && !/^\d+$/.test(steps)) {
      showError("Defence steps must be a whole number of 0 or more.");
      $("steps").focus();
      return;
    }
    stopCurrent();
    resetResult();
    const key = $("api-key").value.trim();
    const params = new URLSearchParams();
    params.set("defend", $("defend").value);
    if ($("multi").checked) params.set("multi", "true");
    if (steps) params.set("steps", steps);
    const chosen = $("model").value; // "name\u0000version" of a served model, or "" (server default)
    if (chosen) {
      const [name, version] = chosen.split("\u0000");
      params.set("model", name);
      params.set("version", version);
    }
    const body = new FormData();
    body.append("file", file, file.name);

    if (originalUrl) URL.revokeObjectURL(originalUrl);
    originalUrl = URL.createObjectURL(file);

    setBusy(true);
    setStatus("Uploading " + file.name + " (" + (file.size / 1e6).toFixed(1) + " MB)...");
    const job = { key, objectUrls: [], canceled: false, timer: null, started: Date.now() };
    current = job;
    try {
      const response = await request(apiUrl("classify?" + params.toString()), key, { method: "POST", body });
      const data = await response.json();
      job.jobId = data.job_id;
      job.statusUrl = serverUrl(data.status_url || response.headers.get("Location"), "jobs/" + data.job_id);
      setStatus("Uploaded. Job " + data.job_id + " is " + (data.status || "queued") + ".");
      poll(job, POLL_MIN_MS);
    } catch (err) {
      if (job.canceled) return;
      setBusy(false);
      setStatus("Upload failed.");
      showError(describe(err));
      current = null;
    }
  });

  cancelButton.addEventListener("click", async () => {
    const job = current;
    if (!job) return;
    if (!job.jobId) {
      stopCurrent();
      setBusy(false);
      setStatus("Canceled.");
      return;
    }
    cancelButton.disabled = true;
    try {
      await request(job.statusUrl, job.key, { method: "DELETE" });
      setStatus("Cancel requested for job " + job.jobId + "...");
    } catch (err) {
      showError(describe(err));
    } finally {
      cancelButton.disabled = false;
    }
  });

  // ---- polling ------------------------------------------------------------------------------

  function queueText(data) {
    const ahead = data.queue_position; // jobs waiting ahead of this one
    if (typeof ahead === "number") {
      return ahead <= 0 ? " (next in line)" : " (" + ahead + (ahead === 1 ? " job" : " jobs") + " ahead in the queue)";
    }
    return "";
  }

  async function poll(job, delay) {
    if (job.canceled) return;
    let data;
    try {
      const response = await request(job.statusUrl, job.key);
      data = await response.json();
    } catch (err) {
      if (job.canceled) return;
      if (err instanceof ApiError && (err.status === 0 || err.status === 503 || err.status === 502)) {
        // Transient: keep polling, but say so.
        setStatus("Waiting for the server... (" + describe(err) + ")");
        job.timer = setTimeout(() => poll(job, Math.min(POLL_MAX_MS * 2, delay * 2)), Math.max(delay, 1000));
        return;
      }
      setBusy(false);
      setStatus("Could not get the job's status.");
      showError(describe(err));
      current = null;
      return;
    }
    if (job.canceled) return;
    const elapsed = ((Date.now() - job.started) / 1000).toFixed(0);
    const status = data.status;
    if (status === "queued" || status === "deferred" || status === "scheduled") {
      setStatus("Queued" + queueText(data) + ". " + elapsed + " s elapsed.");
    } else if (status === "started") {
      const stage = data.progress && data.progress.stage ? " (" + data.progress.stage + ")" : "";
      setStatus("Running" + stage + "... " + elapsed + " s elapsed.");
    }
    if (!TERMINAL.has(status)) {
      job.timer = setTimeout(() => poll(job, Math.min(POLL_MAX_MS, delay * 1.5)), delay);
      return;
    }
    setBusy(false);
    if (status === "finished" && data.result) {
      setStatus("Finished in " + elapsed + " s.");
      showResult(job, data.result);
    } else if (status === "canceled" || status === "stopped") {
      setStatus("The job was canceled.");
      current = null;
    } else {
      setStatus("The job failed.");
      showError("The job failed: " + jobErrorText(data.error));
      current = null;
    }
  }

  function jobErrorText(error) {
    if (!error) return "no reason given.";
    if (typeof error === "string") return error;
    if (error.message) return error.message + (error.code ? " (" + error.code + ")" : "");
    return JSON.stringify(error);
  }

  // ---- result -------------------------------------------------------------------------------

  function resetResult() {
    resultEl.hidden = true;
    $("video-labels").replaceChildren();
    $("clips-table").tBodies[0].replaceChildren();
    $("clip-select").replaceChildren();
    $("figures-section").hidden = true;
    $("no-figures").hidden = true;
    for (const id of ["original-video", "restored-video"]) {
      const video = $(id);
      video.removeAttribute("src");
      video.load();
    }
    for (const id of ["flow-img", "mc-img"]) {
      $(id).removeAttribute("src");
      $(id).alt = "";
    }
    for (const id of ["original-note", "restored-note"]) $(id).hidden = true;
  }

  function labelItem(entry) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label-name";
    name.textContent = entry.label;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = entry.score;
    meter.setAttribute("aria-label", entry.label + " score");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = pct(entry.score);
    li.append(name, meter, score);
    return li;
  }

  // The flag's signals as a tooltip: the score is over 1 when any of them is far out of its clean range.
  function describeSignals(clip) {
    const signals = clip.signals || {};
    const names = Object.keys(signals);
    if (!names.length) return "";
    return "Score over the flag threshold (above 1: suspected). Signals: " +
      names.map((n) => n + " " + fmt(signals[n], 4)).join(", ");
  }

  function showResult(job, result) {
    const labels = $("video-labels");
    for (const entry of result.labels || []) labels.append(labelItem(entry));

    const model = result.model || {};
    const top = (result.labels || [])[0];
    const suspected = (result.clips || []).filter((c) => c.suspected_attack).length;
    $("result-summary").textContent =
      (top ? "Top label: " + top.label + " (" + pct(top.score) + "). " : "") +
      "Answered by model " + (model.name || "?") + " v" + (model.version || "?") +
      (model.sha256 ? " (sha256 " + model.sha256.slice(0, 12) + ")" : "") + ", " +
      "defence " + ((result.defense || {}).mode || (result.defended ? "always" : "off")) + ", " +
      (result.clips || []).length + " clip(s)" +
      (suspected ? ", " + suspected + " suspected attack(s)." : ", no suspected attack.");

    const tbody = $("clips-table").tBodies[0];
    for (const clip of result.clips || []) {
      const tr = document.createElement("tr");
      const cells = [
        "#" + clip.index,
        clip.start_frame + "–" + clip.end_frame,
        (clip.labels || []).slice(0, 3).map((l) => l.label + " " + pct(l.score)).join(", "),
        fmt(clip.mc_loss_before, 4),
        fmt(clip.mc_loss_after, 4),
        describeDecision(clip),
        clip.suspected_attack ? "Yes: suspected attack" : "No",
        clip.attack_score == null ? "–" : fmt(clip.attack_score, 2),
      ];
      cells.forEach((text, i) => {
        const td = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) td.scope = "row";
        td.textContent = text;
        if ((i === 6 || i === 7) && clip.suspected_attack) td.className = "flag";
        if (i === 7) td.title = describeSignals(clip);
        tr.append(td);
      });
      tbody.append(tr);
    }

    resultEl.hidden = false;

    const original = $("original-video");
    original.src = originalUrl;
    original.onerror = () => {
      $("original-note").textContent = "This browser cannot play the original file's format; the restored video is H.264 mp4.";
      $("original-note").hidden = false;
    };

    loadRestored(job, result);
    setupFigures(job, result);
  }

  async function fetchBlobUrl(job, url) {
    const response = await request(url, job.key);
    const blob = await response.blob();
    const objectUrl = URL.createObjectURL(blob);
    job.objectUrls.push(objectUrl);
    return objectUrl;
  }

  async function loadRestored(job, result) {
    const note = $("restored-note");
    try {
      const url = await fetchBlobUrl(job, serverUrl(result.restored_url, "jobs/" + job.jobId + "/restored"));
      if (job.canceled) return;
      $("restored-video").src = url;
    } catch (err) {
      if (job.canceled) return;
      note.textContent = "Could not load the restored video. " + describe(err);
      note.hidden = false;
    }
  }

  function describeDecision(clip) {
    if (!clip.decision) return "–"; // a result stored before decisions were recorded
    const steps = clip.defence_steps || 0;
    const text = {
      purified: "purified",
      stopped_early: "purified, stopped early",
      skipped: "skipped (looked clean)",
      off: "off",
    }[clip.decision] || clip.decision;
    return clip.decision === "skipped" || clip.decision === "off" ? text : text + ", " + steps + " step(s)";
  }

  function setupFigures(job, result) {
    const clips = (result.clips || []).filter((c) => c.decision !== "skipped" && c.decision !== "off");
    if (!result.defended || clips.length === 0) {
      $("no-figures").hidden = false;
      return;
    }
    const select = $("clip-select");
    for (const clip of clips) {
      const option = document.createElement("option");
      option.value = String(clip.index);
      option.textContent = "Clip " + clip.index + " (frames " + clip.start_frame + "–" + clip.end_frame + ")";
      select.append(option);
    }
    select.onchange = () => showFigures(job, clips[select.selectedIndex]);
    $("figures-section").hidden = false;
    showFigures(job, clips[0]);
  }

  async function showFigures(job, clip) {
    const base = "jobs/" + job.jobId + "/clips/" + clip.index + "/";
    const top = (clip.labels || [])[0];
    const items = [
      [
        "flow-img",
        serverUrl(clip.flow_url, base + "flow.png"),
        "Clip " + clip.index + ": frames with their optical flow before and after purification" +
          (top ? "; classified as " + top.label : ""),
      ],
      [
        "mc-img",
        serverUrl(clip.mc_loss_url, base + "mc_loss.png"),
        "Clip " + clip.index + ": MC loss over the defence steps, from " + fmt(clip.mc_loss_before, 4) +
          " before to " + fmt(clip.mc_loss_after, 4) + " after purification",
      ],
    ];
    for (const [id, url, alt] of items) {
      const img = $(id);
      try {
        const objectUrl = await fetchBlobUrl(job, url);
        if (job.canceled) return;
        img.alt = alt;
        img.src = objectUrl;
      } catch (err) {
        if (job.canceled) return;
        img.removeAttribute("src");
        img.alt = "";
        showError("Could not load a picture of clip " + clip.index + ". " + describe(err));
      }
    }
  }

  // ---- model info (best effort; needs the key when keys are enabled) ------------------------

  function fillModels(models) {
    // The served models of GET /models, as options "name vVERSION"; the chosen one is kept.
    const select = $("model");
    const chosen = select.value;
    while (select.options.length > 1) select.remove(1);
    for (const m of models.filter((entry) => entry.served)) {
      const option = document.createElement("option");
      option.value = m.name + "\u0000" + m.version;
      option.textContent = m.name + " v" + m.version + (m.default ? " (default)" : "") +
        ((m.workers || []).length ? "" : " (no worker running)");
      select.append(option);
    }
    select.value = Array.from(select.options).some((o) => o.value === chosen) ? chosen : "";
  }

  async function loadModelInfo() {
    try {
      const response = await request(apiUrl("models"), $("api-key").value.trim());
      const data = await response.json();
      const bundle = data.bundle || data.model || data;
      const name = bundle.name || "?";
      const version = bundle.version || "?";
      const labels = data.labels || bundle.labels || [];
      const served = (data.models || []).filter((m) => m.served).length;
      const el = $("model-info");
      el.textContent = "Default model: " + name + " v" + version + (labels.length ? " · " + labels.length + " labels" : "") +
        (served > 1 ? " · " + served + " models served" : "");
      el.hidden = false;
      fillModels(data.models || []);
    } catch (_) {
      /* optional */
    }
  }

  $("api-key").addEventListener("change", loadModelInfo);
  loadModelInfo();
})();
