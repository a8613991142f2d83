// cadence serve's page: plain DOM and fetch, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let recipes = [];   // /v1/recipes entries of the chosen model
let current = null; // the job being shown
let events = null;  // its EventSource

function apiKey() { return localStorage.getItem("cadence-api-key") || ""; }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) $("key-row").hidden = false;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
  return body;
}

// A <video>, an <img> and an EventSource cannot send a header: the key goes in the query.
function withKey(url) {
  return apiKey() ? `${url}${url.includes("?") ? "&" : "?"}api_key=${encodeURIComponent(apiKey())}` : url;
}

function describe(entry) {
  const parts = [];
  if (entry.real_size) parts.push(`${entry.real_size.speedup.toFixed(2)}x at ${entry.real_size.where}`);
  if (entry.fidelity) parts.push(`${entry.fidelity.psnr_db.toFixed(1)} dB PSNR, SSIM ${entry.fidelity.ssim.toFixed(3)}, ` +
                                 `${entry.fidelity.speedup_on_reference.toFixed(2)}x (${entry.fidelity.where})`);
  if (entry.summary) parts.push(entry.summary);
  return parts.join(" · ");
}

// The option's label: the speedup at the real size where measured, else on the reference model; its PSNR.
function short(entry) {
  const bits = [];
  if (entry.real_size) bits.push(`${entry.real_size.speedup.toFixed(2)}x at Wan2.1-1.3B size`);
  else if (entry.fidelity) bits.push(`${entry.fidelity.speedup_on_reference.toFixed(2)}x on ref-video`);
  if (entry.fidelity) bits.push(`${entry.fidelity.psnr_db.toFixed(1)} dB`);
  return `${entry.default ? "default: " : ""}${entry.recipe}${bits.length ? "  —  " + bits.join(", ") : ""}`;
}

async function loadModels() {
  const models = (await api("/v1/models")).data;
  $("model").replaceChildren(...models.map((m) => new Option(`${m.id} (${m.task})`, m.id)));
  await loadRecipes();
}

async function loadRecipes() {
  recipes = (await api(`/v1/recipes?model=${encodeURIComponent($("model").value)}`)).data;
  const options = recipes.map((entry, i) => new Option(short(entry), String(i)));
  options.push(new Option("custom…", "custom"));
  $("recipe").replaceChildren(...options);
  $("recipe").value = String(Math.max(0, recipes.findIndex((entry) => entry.default)));
  showRecipe();
}

function showRecipe() {
  const custom = $("recipe").value === "custom";
  $("custom-recipe").hidden = !custom;
  $("recipe-measured").textContent = custom ? "any recipe string; `cadence recipes` lists the techniques"
                                            : describe(recipes[Number($("recipe").value)]);
}

function chosenRecipe() {
  return $("recipe").value === "custom" ? $("custom-recipe").value : recipes[Number($("recipe").value)].recipe;
}

function figure(url, mediaType, caption) {
  const figureElement = document.createElement("figure");
  let media;
  if (mediaType === "video/mp4") {
    media = document.createElement("video");
    Object.assign(media, { autoplay: true, loop: true, muted: true, playsInline: true, controls: true });
  } else {
    media = document.createElement("img");
    media.alt = caption;
  }
  media.src = withKey(url);
  media.className = "result";
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figureElement.append(media, text);
  return figureElement;
}

function showJob(job) {
  current = job;
  $("job").hidden = false;
  $("bar").style.width = `${Math.round(100 * job.progress)}%`;
  const timing = job.timings.generation_s ? `, generated in ${job.timings.generation_s.toFixed(2)} s` : "";
  $("status").textContent = `${job.id}: ${job.status}, step ${job.step} of ${job.total_steps}${timing}`;
  $("error").hidden = !job.error;
  $("error").textContent = job.error || "";
  const running = job.status === "queued" || job.status === "in_progress";
  $("cancel").hidden = !running;
  $("generate").disabled = running;
  if (!running) health();
  if (job.status !== "completed") return;
  const outputs = [figure(job.content_url, job.media_type, job.recipe)];
  if (job.baseline_url) outputs.unshift(figure(job.baseline_url, job.media_type, "baseline (unaccelerated)"));
  $("outputs").replaceChildren(...outputs);
  const f = job.fidelity;
  $("fidelity").textContent = f ? `against the baseline: PSNR ${f.psnr_db === null ? "identical" : f.psnr_db.toFixed(2) + " dB"}, ` +
                                  `SSIM ${f.ssim.toFixed(4)}, ${f.speedup.toFixed(2)}x faster here` : "";
}

function follow(job) {
  if (events) events.close();
  events = new EventSource(withKey(`/v1/videos/${job.id}/events`));
  const update = (message) => showJob(JSON.parse(message.data));
  events.addEventListener("progress", update);
  events.addEventListener("done", (message) => { update(message); events.close(); });
  events.onerror = () => { events.close(); api(`/v1/videos/${job.id}`).then(showJob).catch(() => {}); };
}

async function submit(event) {
  event.preventDefault();
  if (!$("key-row").hidden) localStorage.setItem("cadence-api-key", $("api-key").value);
  $("outputs").replaceChildren();
  $("fidelity").textContent = "";
  try {
    const job = await api("/v1/videos", { method: "POST", body: JSON.stringify({
      model: $("model").value, prompt: $("prompt").value, recipe: chosenRecipe(),
      steps: Number($("steps").value), seed: Number($("seed").value), compare_baseline: $("compare").checked }) });
    showJob(job);
    follow(job);
  } catch (error) {
    $("job").hidden = false;
    $("error").hidden = false;
    $("error").textContent = error.message;
  }
}

async function health() {
  try {
    const state = await (await fetch("/health")).json();
    $("health").textContent = `${state.models.join(", ")} · ${state.running} running, ${state.queued} queued`;
  } catch (error) {
    $("health").textContent = "server unreachable";
  }
}

$("request").addEventListener("submit", submit);
$("model").addEventListener("change", loadRecipes);
$("recipe").addEventListener("change", showRecipe);
$("cancel").addEventListener("click", () => current && api(`/v1/videos/${current.id}`, { method: "DELETE" }).then(showJob));
$("api-key").value = apiKey();
loadModels().catch((error) => { $("recipe-measured").textContent = error.message; });
health();
setInterval(health, 3000);
