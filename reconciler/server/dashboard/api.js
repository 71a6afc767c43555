// Talking to the node: bearer-token fetch, NDJSON and server-sent-event readers, and the
// Kubernetes list-then-watch loop with reconnect backoff.

export const API = '/apis/exo.dev/v1alpha1';
export const THROUGHPUT_PATH = '/internal/dashboard/v1/throughput';

/** The node refused the token (401): the page asks for it again. */
export class Unauthorized extends Error {
  constructor() { super('the node refused the token (401)'); this.name = 'Unauthorized'; }
}

export class Api {
  constructor(token) { this.token = token; }

  /** fetch() with the bearer token; throws Unauthorized on 401, returns every other answer. */
  async fetch(path, init = {}) {
    const headers = { ...(init.headers || {}), Authorization: `Bearer ${this.token}` };
    const response = await fetch(path, { ...init, headers, cache: 'no-store' });
    if (response.status === 401) throw new Unauthorized();
    return response;
  }
}

/** The message of a Status or OpenAI error body, else the HTTP status line. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || body?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }
}

/** Lines of a streamed body, as they arrive. */
export async function* readLines(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        yield buffer.slice(0, end).replace(/\r$/, '');
        buffer = buffer.slice(end + 1);
      }
    }
    buffer += decoder.decode();
    if (buffer) yield buffer;
  } finally {
    reader.releaseLock();
  }
}

/** Server-sent events of a streamed body: {event, data} per blank-line-terminated block. */
export async function* readEvents(body) {
  let event = 'message';
  let data = [];
  for await (const line of readLines(body)) {
    if (line === '') {
      if (data.length) yield { event, data: data.join('\n') };
      event = 'message';
      data = [];
      continue;
    }
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') event = value;
  }
  if (data.length) yield { event, data: data.join('\n') };
}

/** Wait `ms`, or less if `signal` aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/** Reconnect delays: 1 s doubling to 30 s, with jitter so several tabs don't reconnect together. */
export class Backoff {
  constructor({ first = 1000, max = 30000 } = {}) { this.first = first; this.max = max; this.current = first; }
  reset() { this.current = this.first; }
  next() {
    const delay = this.current * (0.8 + Math.random() * 0.4);
    this.current = Math.min(this.current * 2, this.max);
    return delay;
  }
}

/**
 * Keep a collection in sync: list it, then watch from the list's resourceVersion; on a 410
 * (history gone) list again; when a stream ends or fails, reconnect after a backoff resuming at
 * the last resourceVersion seen. Runs until `signal` aborts; a 401 calls `onUnauthorized`.
 */
export async function watchCollection({ api, path, signal, onReset, onEvent, onState, onUnauthorized }) {
  const backoff = new Backoff();
  let resourceVersion = null;
  while (!signal.aborted) {
    let relist = false;
    try {
      if (resourceVersion === null) {
        onState('connecting');
        const list = await api.fetch(path, { signal });
        if (!list.ok) throw new Error(`list ${path}: ${await errorMessage(list)}`);
        const body = await list.json();
        onReset(body.items || []);
        resourceVersion = body.metadata?.resourceVersion ?? '0';
      }
      const url = `${path}?watch=1&resourceVersion=${encodeURIComponent(resourceVersion)}`;
      const watch = await api.fetch(url, { signal });
      if (watch.status === 410) {
        resourceVersion = null;
        continue;
      }
      if (!watch.ok) throw new Error(`watch ${path}: ${await errorMessage(watch)}`);
      onState('live');
      backoff.reset();
      for await (const line of readLines(watch.body)) {
        if (!line.trim()) continue;
        const event = JSON.parse(line);
        if (event.type === 'ERROR') {
          relist = event.object?.code === 410;
          break;
        }
        onEvent(event.type, event.object);
        resourceVersion = event.object?.metadata?.resourceVersion ?? resourceVersion;
      }
    } catch (error) {
      if (error instanceof Unauthorized) { onUnauthorized(); return; }
      if (signal.aborted) return;
      console.warn(`exo dashboard: ${path}:`, error);
    }
    if (relist) { resourceVersion = null; continue; }
    if (signal.aborted) return;
    onState('reconnecting');
    await sleep(backoff.next(), signal);
  }
}

/**
 * Follow this node's tokens/s (server-sent events). Calls `onSample` with each event's data;
 * `onState('unavailable')` when the node serves no throughput stream (404: it stops then).
 */
export async function followThroughput({ api, signal, onSample, onState, onUnauthorized }) {
  const backoff = new Backoff();
  while (!signal.aborted) {
    try {
      const response = await api.fetch(THROUGHPUT_PATH, { signal, headers: { Accept: 'text/event-stream' } });
      if (response.status === 404) { onState('unavailable'); return; }
      if (!response.ok) throw new Error(`throughput: ${await errorMessage(response)}`);
      onState('live');
      backoff.reset();
      for await (const { event, data } of readEvents(response.body)) {
        if (event === 'throughput') onSample(JSON.parse(data));
      }
    } catch (error) {
      if (error instanceof Unauthorized) { onUnauthorized(); return; }
      if (signal.aborted) return;
      console.warn('exo dashboard: throughput:', error);
    }
    if (signal.aborted) return;
    onState('reconnecting');
    await sleep(backoff.next(), signal);
  }
}
