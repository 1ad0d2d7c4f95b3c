// The platform's HTTP API as the console calls it: every request carries the operator's
// key (kept in sessionStorage: gone when the tab closes). The event stream is read with
// fetch() and a stream reader because EventSource cannot send an Authorization header.

const KEY = "gpufaas.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.field = body?.field;
  }
}

export function savedKey() {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const key = savedKey();
  return { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...extra };
}

// GET (or, with a body, POST) a JSON route; an error answer throws ApiError.
export async function api(path, body) {
  const init = { headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = { error: text.slice(0, 200) };
  }
  if (!resp.ok) throw new ApiError(resp.status, parsed);
  return parsed;
}

// Parse one SSE frame ("id: 7\nevent: kind\ndata: {...}"); null for a comment.
function frame(text) {
  const out = { id: null, kind: null, data: "" };
  for (const line of text.split("\n")) {
    const at = line.indexOf(":");
    if (at === 0) continue;
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "id") out.id = value;
    else if (field === "event") out.kind = value;
    else if (field === "data") out.data += value;
  }
  if (!out.data) return null;
  try {
    return { id: out.id, ...JSON.parse(out.data) };
  } catch {
    return null;
  }
}

// Follow /v1/events until `signal` aborts: recent history first (?replay=all, bounded by
// the server), then live; after a dropped connection, again from the last id seen.
// onState("live" | "reconnecting" | "denied") tells the page how the stream is doing.
export async function followEvents(onEvent, onState, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const extra = lastId === null ? {} : { "Last-Event-ID": lastId };
      const url = lastId === null ? "/v1/events?replay=all" : "/v1/events";
      const resp = await fetch(url, { headers: headers(extra), signal });
      if (resp.status === 401 || resp.status === 403) {
        onState("denied");
        return;
      }
      if (!resp.ok || !resp.body) throw new ApiError(resp.status, null);
      onState("live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replaceAll("\r\n", "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = frame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event) {
            if (event.id !== null) lastId = event.id;
            onEvent(event);
          }
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}
