// The chat page: keeps the conversation in memory, streams each answer from /v1/chat/completions (server-sent events
// read from fetch's body stream) and shows it as it arrives. Settings and the API key stay in this browser's
// localStorage. No framework and no build step: the server serves this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop_strings", "api_key"];
const history = [];
let model = null;
let running = null; // the AbortController of the answer being streamed

for (const id of SETTINGS) {
  const saved = localStorage.getItem("phixtral." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("phixtral." + id, $(id).value));
}
$("api_key").addEventListener("change", loadModel);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "this server needs an API key (see Settings)";
      $("api_key").focus();
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    model = (await response.json()).data[0];
    $("model").textContent = `${model.id}, context ${model.max_model_len} tokens`;
  } catch (e) {
    $("model").textContent = "cannot reach the server: " + e.message;
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function number(id, parse) {
  const text = $(id).value.trim();
  return text === "" ? undefined : parse(text);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (model) body.model = model.id;
  const settings = {
    temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
    top_k: number("top_k", (t) => parseInt(t, 10)), max_tokens: number("max_tokens", (t) => parseInt(t, 10)),
    seed: number("seed", (t) => parseInt(t, 10)),
  };
  for (const [k, v] of Object.entries(settings)) if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  const stops = $("stop_strings").value.split("\n").filter((s) => s !== "");
  if (stops.length) body.stop = stops;
  return body;
}

// Yields the JSON payloads of a server-sent event stream until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  const meta = document.createElement("div");
  meta.className = "meta";
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let content = "";
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        content += (choice.delta && choice.delta.content) || "";
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      answer.textContent = content;
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    history.push({ role: "assistant", content });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    meta.textContent = (tokens !== null ? `${tokens} tokens in ${seconds.toFixed(1)} s` : `${seconds.toFixed(1)} s`)
      + (finish ? `, finish: ${finish}` : "");
    answer.appendChild(meta);
    answer.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content });
      meta.textContent = "stopped";
      answer.appendChild(meta);
      answer.dataset.state = "stopped";
    } else {
      history.pop();
      answer.remove();
      bubble("error", "Error: " + e.message).dataset.state = "error";
    }
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => {
  if (running) running.abort();
  history.length = 0;
  $("messages").replaceChildren();
});
loadModel();
