// The chat box: models from /v1/models, answers streamed from /v1/chat/completions (SSE).

import { Unauthorized, errorMessage, readEvents } from './api.js';
import { formatRate, h } from './views.js';

const $ = (id) => document.getElementById(id);
const DEFAULT_MAX_TOKENS = 256;

function maxTokens() {
  const value = Number.parseInt($('chat-max-tokens').value, 10);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 8192) : DEFAULT_MAX_TOKENS;
}

export class Chat {
  constructor({ onUnauthorized }) {
    this.onUnauthorized = onUnauthorized;
    this.api = null;
    this.history = [];        // {role, content} of the conversation so far
    this.answering = null;    // AbortController of the answer being streamed
    this.available = false;
    $('chat-form').addEventListener('submit', (event) => { event.preventDefault(); this.send(); });
    $('chat-input').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    $('chat-stop').addEventListener('click', () => this.answering?.abort());
    $('chat-model').addEventListener('change', () => this.updateControls());
  }

  /** Start (or restart, with a new token) against the node. */
  connect(api) {
    this.api = api;
    this.answering?.abort();
    this.refreshModels();
  }

  /** Ask the node which models it serves; keep the current choice if it is still there. */
  async refreshModels() {
    const api = this.api;
    if (!api) return;
    let models = [];
    try {
      const response = await api.fetch('/v1/models');
      if (response.status === 404) {
        this.setAvailable(false, 'This node does not serve the OpenAI API (/v1) yet.');
        return;
      }
      if (!response.ok) {
        this.setAvailable(false, `Could not list models: ${await errorMessage(response)}`);
        return;
      }
      models = ((await response.json()).data || []).map((m) => m.id).filter(Boolean).sort();
    } catch (error) {
      if (error instanceof Unauthorized) { this.onUnauthorized(); return; }
      this.setAvailable(false, `Could not list models: ${error.message}`);
      return;
    }
    const select = $('chat-model');
    const previous = select.value;
    select.replaceChildren(...models.map((id) => h('option', { value: id }, id)));
    if (models.includes(previous)) select.value = previous;
    this.setAvailable(models.length > 0, models.length ? null : 'No model is ready to chat with yet.');
  }

  setAvailable(available, note) {
    this.available = available;
    const log = $('chat-log');
    const placeholder = $('chat-empty');
    if (!this.history.length) {
      const text = note || 'Pick a model and send a message.';
      if (placeholder) placeholder.textContent = text;
      else log.replaceChildren(h('p', { class: 'empty', id: 'chat-empty' }, text));
    }
    this.updateControls();
  }

  updateControls() {
    const busy = this.answering !== null;
    const ready = this.available && Boolean($('chat-model').value);
    $('chat-model').disabled = !this.available || busy;
    $('chat-input').disabled = !ready;
    $('chat-send').disabled = !ready || busy;
    $('chat-stop').hidden = !busy;
  }

  addMessage(role, text) {
    $('chat-empty')?.remove();
    const body = h('div', { class: 'bubble-text' }, text);
    const message = h('div', { class: `message-row ${role}`, dataset: { role } },
      h('div', { class: 'bubble' }, h('div', { class: 'who' }, role === 'user' ? 'You' : $('chat-model').value), body));
    $('chat-log').append(message);
    message.scrollIntoView({ block: 'end' });
    return { message, body };
  }

  async send() {
    const input = $('chat-input');
    const content = input.value.trim();
    const model = $('chat-model').value;
    if (!content || !model || this.answering || !this.available) return;
    input.value = '';
    this.history.push({ role: 'user', content });
    this.addMessage('user', content);
    const { message, body } = this.addMessage('assistant', '');
    message.classList.add('streaming');
    this.answering = new AbortController();
    this.updateControls();
    const started = performance.now();
    let firstToken = null;
    let chunks = 0;
    let answer = '';
    let failure = null;
    try {
      const response = await this.api.fetch('/v1/chat/completions', {
        method: 'POST',
        signal: this.answering.signal,
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify({ model, messages: this.history, stream: true, max_tokens: maxTokens() }),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const { data } of readEvents(response.body)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || 'the model failed');
        const delta = chunk.choices?.[0]?.delta?.content;
        if (!delta) continue;
        firstToken ??= performance.now();
        chunks += 1;
        answer += delta;
        body.textContent = answer;
        message.dataset.chunks = String(chunks);
        message.scrollIntoView({ block: 'end' });
      }
    } catch (error) {
      if (error instanceof Unauthorized) { this.onUnauthorized(); return; }
      if (error.name !== 'AbortError') failure = error.message;
    } finally {
      message.classList.remove('streaming');
      this.answering = null;
      this.updateControls();
    }
    if (answer) this.history.push({ role: 'assistant', content: answer });
    if (failure) {
      message.classList.add('failed');
      body.append(h('div', { class: 'chat-error' }, failure));
    }
    message.dataset.done = 'true';
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    $('chat-stats').textContent = chunks
      ? `${chunks} tokens · first token after ${Math.round((firstToken - started))} ms · ${formatRate(chunks / Math.max(seconds, 1e-3))} tokens/s`
      : '';
    input.focus();
  }
}
