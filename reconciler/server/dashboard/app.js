// The exo dashboard: the token, the cluster state kept in sync by watch streams, and rendering.

import { API, Api, followThroughput, watchCollection } from './api.js';
import { Chat } from './chat.js';
import {
  deploymentKey, deploymentReady, formatRate, nodeColours, nodeReady, renderDeployments, renderNodes,
  renderShardMap, renderSparkline,
} from './views.js';

const TOKEN_KEY = 'exo-dashboard-token';
const SPARKLINE_SAMPLES = 60;
const $ = (id) => document.getElementById(id);

const COLLECTIONS = {
  nodes: { path: `${API}/nodes`, key: (obj) => obj.metadata.name },
  deployments: { path: `${API}/modeldeployments`, key: deploymentKey },
  shards: { path: `${API}/shards`, key: (obj) => obj.metadata.name },
};

const state = {
  objects: { nodes: new Map(), deployments: new Map(), shards: new Map() },
  streams: { nodes: 'idle', deployments: 'idle', shards: 'idle' },
  throughput: { samples: [], latest: null, stream: 'idle' },
};
let session = null;   // AbortController of the current connection
let renderQueued = false;
const refused = () => askForToken('The node refused the token (401). Enter it again.');
const chat = new Chat({ onUnauthorized: refused });

// --- token ---------------------------------------------------------------------------------------

/** A `#token=…` in the address bar wins (and is removed from it); else the one kept in this tab. */
function takeToken() {
  const match = window.location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (match) {
    const token = decodeURIComponent(match[1]);
    history.replaceState(null, '', window.location.pathname + window.location.search);
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(message = '') {
  session?.abort();
  session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('dashboard').hidden = true;
  $('sign-out').hidden = true;
  $('served-by').hidden = true;
  $('auth').hidden = false;
  $('auth-error').textContent = message;
  setConnection('idle', 'Not connected');
  $('token-input').focus();
}

$('auth-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token-input').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token-input').value = '';
  connect(token);
});

$('sign-out').addEventListener('click', () => askForToken());

// --- connection ----------------------------------------------------------------------------------

function connect(token) {
  session?.abort();
  session = new AbortController();
  const { signal } = session;
  const api = new Api(token);
  for (const map of Object.values(state.objects)) map.clear();
  state.throughput = { samples: [], latest: null, stream: 'idle' };
  $('auth').hidden = true;
  $('dashboard').hidden = false;
  $('sign-out').hidden = false;

  for (const [name, { path, key }] of Object.entries(COLLECTIONS)) {
    const objects = state.objects[name];
    watchCollection({
      api, path, signal,
      onUnauthorized: refused,
      onState: (value) => { state.streams[name] = value; scheduleRender(); },
      onReset: (items) => {
        objects.clear();
        for (const item of items) objects.set(key(item), item);
        changed(name);
      },
      onEvent: (type, obj) => {
        if (type === 'DELETED') objects.delete(key(obj));
        else objects.set(key(obj), obj);
        changed(name);
      },
    });
  }
  followThroughput({
    api, signal,
    onUnauthorized: refused,
    onState: (value) => { state.throughput.stream = value; scheduleRender(); },
    onSample: (sample) => {
      const { samples } = state.throughput;
      samples.push(sample.tokensPerSecond || 0);
      if (samples.length > SPARKLINE_SAMPLES) samples.shift();
      state.throughput.latest = sample;
      scheduleRender();
    },
  });
  chat.connect(api);
}

// The models the node serves follow the deployments' readiness: ask again when that changes.
let readinessSignature = '';
let modelRefresh = null;
function changed(collection) {
  if (collection === 'deployments') {
    const signature = [...state.objects.deployments.values()]
      .map((md) => `${deploymentKey(md)}:${md.status?.readyReplicas ?? 0}`).sort().join(',');
    if (signature !== readinessSignature) {
      readinessSignature = signature;
      clearTimeout(modelRefresh);
      modelRefresh = setTimeout(() => chat.refreshModels(), 300);
    }
  }
  scheduleRender();
}

// --- rendering -----------------------------------------------------------------------------------

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function setConnection(tone, text) {
  $('conn').dataset.state = tone;
  $('conn-text').textContent = text;
}

function sorted(map, by = (obj) => obj.metadata.name) {
  return [...map.values()].sort((a, b) => by(a).localeCompare(by(b)));
}

/** The node that serves this page: the one whose API address is this page's host. */
function servingNode(nodes) {
  const host = window.location.host;
  return nodes.find((n) => n.spec && `${n.spec.address}:${n.spec.apiPort}` === host)?.metadata.name ?? null;
}

function renderSummary(nodes, deployments, shards) {
  $('sum-nodes').textContent = `${nodes.filter(nodeReady).length} / ${nodes.length}`;
  $('sum-deployments').textContent = `${deployments.filter(deploymentReady).length} / ${deployments.length}`;
  $('sum-shards').textContent = `${shards.filter((s) => s.status?.phase === 'Ready').length} / ${shards.length}`;
  const { latest, samples, stream } = state.throughput;
  $('throughput-value').textContent = latest ? formatRate(latest.tokensPerSecond) : '–';
  $('throughput-node').textContent = latest?.node ? `· ${latest.node}` : '';
  $('throughput-foot').textContent = stream === 'unavailable' ? 'not measured on this node'
    : latest ? `${latest.generatedTokens.toLocaleString()} tokens in all` : 'waiting for the first sample…';
  renderSparkline($('sparkline'), samples);
}

function renderStreams() {
  const values = Object.values(state.streams);
  for (const el of document.querySelectorAll('[data-stream]')) {
    const value = state.streams[el.dataset.stream];
    el.dataset.state = value;
    el.textContent = value === 'live' ? 'live' : value === 'reconnecting' ? 'reconnecting…' : 'connecting…';
  }
  if (values.every((v) => v === 'live')) setConnection('live', 'Live');
  else if (values.some((v) => v === 'reconnecting')) setConnection('warn', 'Reconnecting…');
  else setConnection('idle', 'Connecting…');
}

function render() {
  if (!session) return;
  const nodes = sorted(state.objects.nodes);
  const deployments = sorted(state.objects.deployments, deploymentKey);
  const shards = sorted(state.objects.shards);
  const colours = nodeColours([...nodes.map((n) => n.metadata.name), ...shards.map((s) => s.spec.nodeName)]);
  const servedBy = servingNode(nodes);
  $('served-by').hidden = !servedBy;
  $('served-by').textContent = servedBy ? `via ${servedBy}` : '';
  renderStreams();
  renderSummary(nodes, deployments, shards);
  $('nodes').replaceChildren(renderNodes(nodes, { colours, servedBy }));
  $('deployments').replaceChildren(renderDeployments(deployments, { now: Date.now() }));
  $('shard-map').replaceChildren(renderShardMap(deployments, shards, { colours }));
}

// Ages ("5m") move on without events.
setInterval(() => { if (session && !document.hidden) scheduleRender(); }, 15000);

const token = takeToken();
if (token) connect(token);
else askForToken();
