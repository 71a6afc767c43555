// Rendering: pure functions from the cluster state to DOM elements (text only; nothing from the
// API is ever parsed as HTML).

const PALETTE = ['#6366f1', '#10b981', '#f59e0b', '#ec4899', '#0ea5e9', '#8b5cf6', '#ef4444', '#14b8a6',
  '#84cc16', '#f97316'];

/** Create an element: h('div', {class: 'x', dataset: {node: 'a'}}, 'text', child, ...). */
export function h(tag, attrs = {}, ...children) {
  const svg = ['svg', 'path', 'polyline', 'line', 'rect'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'style') for (const [prop, v] of Object.entries(value)) el.style.setProperty(prop, v);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return '0 B';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  const power = Math.min(Math.floor(Math.log(bytes) / Math.log(1024)), units.length - 1);
  const value = bytes / 1024 ** power;
  return `${value >= 100 || power === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[power]}`;
}

export function formatRate(value) {
  if (!Number.isFinite(value)) return '–';
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

export function age(timestamp, now = Date.now()) {
  const then = Date.parse(timestamp);
  if (!Number.isFinite(then)) return '';
  const seconds = Math.max(0, Math.round((now - then) / 1000));
  if (seconds < 90) return `${seconds}s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)}m`;
  if (seconds < 36 * 3600) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}

export const deploymentKey = (obj) => `${obj.metadata.namespace || 'default'}/${obj.metadata.name}`;
const condition = (obj, type) => (obj.status?.conditions || []).find((c) => c.type === type);
export const nodeReady = (node) => condition(node, 'Ready')?.status === 'True';
export const deploymentReady = (md) => condition(md, 'Ready')?.status === 'True';

/** A colour per node name, stable while the set of nodes stays the same. */
export function nodeColours(names) {
  const sorted = [...new Set(names)].sort();
  return new Map(sorted.map((name, i) => [name, PALETTE[i % PALETTE.length]]));
}

function empty(text) { return h('p', { class: 'empty' }, text); }

function pill(text, tone, title) { return h('span', { class: `pill ${tone}`, title }, text); }

// --- Nodes -------------------------------------------------------------------------------------

function readyPill(node) {
  const ready = condition(node, 'Ready');
  if (!ready) return pill('Unknown', 'neutral');
  if (ready.status === 'True') return pill('Ready', 'ok', ready.message);
  return pill(ready.reason || 'NotReady', 'bad', ready.message);
}

function memoryBar(status) {
  const capacity = status?.capacity?.memory || 0;
  const allocatable = status?.allocatable?.memory || 0;
  if (!capacity) return h('span', { class: 'muted' }, '–');
  const percent = Math.min(100, (allocatable / capacity) * 100);
  return h('div', { class: 'memory', title: `${formatBytes(allocatable)} allocatable of ${formatBytes(capacity)}` },
    h('div', { class: 'meter' }, h('div', { class: 'meter-fill', style: { width: `${percent.toFixed(1)}%` } })),
    h('div', { class: 'memory-text' }, `${formatBytes(allocatable)} free of ${formatBytes(capacity)}`));
}

export function renderNodes(nodes, { colours, servedBy }) {
  if (!nodes.length) return empty('No nodes have registered yet.');
  const rows = nodes.map((node) => {
    const { name } = node.metadata;
    const spec = node.spec || {};
    const status = node.status || {};
    const chip = [status.capacity?.cpu ? `${status.capacity.cpu} CPU` : '', status.capacity?.chip || '']
      .filter(Boolean).join(' · ');
    return h('tr', { dataset: { node: name, ready: String(nodeReady(node)), role: status.role || 'unknown' } },
      h('td', {},
        h('div', { class: 'node-name' },
          h('span', { class: 'swatch', style: { background: colours.get(name) || '#94a3b8' } }),
          h('span', { class: 'name' }, name),
          status.role === 'leader' ? h('span', { class: 'badge leader' }, 'leader') : null,
          name === servedBy ? h('span', { class: 'badge here', title: 'this page is served by this node' }, 'this node') : null),
        chip ? h('div', { class: 'sub muted', title: chip }, chip) : null),
      h('td', {}, readyPill(node)),
      h('td', { class: 'col-memory' }, memoryBar(status)),
      h('td', { class: 'mono' }, spec.address ? `${spec.address}:${spec.apiPort}` : '–'));
  });
  return h('table', { class: 'table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Status'), h('th', {}, 'Memory'), h('th', {}, 'Address'))),
    h('tbody', {}, rows));
}

// --- Deployments -------------------------------------------------------------------------------

function conditionView(c) {
  const tone = c.status === 'True' ? (c.type === 'Degraded' ? 'bad' : c.type === 'Progressing' ? 'info' : 'ok')
    : c.status === 'False' ? (c.type === 'Ready' ? 'bad' : 'neutral') : 'neutral';
  return h('div', { class: 'condition', dataset: { type: c.type, status: c.status } },
    pill(`${c.type}${c.status === 'True' ? '' : c.status === 'False' ? ': False' : ': Unknown'}`, tone),
    c.reason ? h('span', { class: 'reason' }, c.reason) : null,
    c.message ? h('div', { class: 'message muted' }, c.message) : null);
}

export function renderDeployments(deployments, { now }) {
  if (!deployments.length) {
    return empty('No ModelDeployments. Apply one with: exoctl apply -f deployment.yaml');
  }
  const rows = deployments.map((md) => {
    const key = deploymentKey(md);
    const replicas = md.spec?.replicas ?? 1;
    const ready = md.status?.readyReplicas ?? 0;
    const model = md.spec?.model || {};
    const conditions = md.status?.conditions || [];
    return h('tr', { dataset: { deployment: key } },
      h('td', {},
        h('div', { class: 'name' }, md.metadata.name),
        h('div', { class: 'sub muted' }, `${md.metadata.namespace || 'default'} · ${age(md.metadata.creationTimestamp, now)}`)),
      h('td', {},
        h('div', { class: 'mono model', title: model.source }, model.source || '–'),
        model.revision || model.dtype
          ? h('div', { class: 'sub muted' }, [model.revision, model.dtype].filter(Boolean).join(' · ')) : null),
      h('td', { class: 'num' },
        h('span', { class: ready >= replicas && replicas > 0 ? 'replicas ok' : 'replicas' }, `${ready}/${replicas}`)),
      h('td', { class: 'conditions' },
        conditions.length ? conditions.map(conditionView) : h('span', { class: 'muted' }, 'no status yet')));
  });
  return h('table', { class: 'table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Model'), h('th', { class: 'num' }, 'Ready'),
      h('th', {}, 'Conditions'))),
    h('tbody', {}, rows));
}

// --- Shard map ---------------------------------------------------------------------------------

/** What a shard is doing: 'Loading 40%', 'Downloading 42% · 12.5 MiB/s', or its phase. */
export function shardDetail(status) {
  const phase = status?.phase || 'Pending';
  if (phase === 'Loading') return `Loading ${Math.round(shardProgress(status) * 100)}%`;
  if (phase !== 'Downloading') return phase;
  const percent = `Downloading ${Math.floor(shardProgress(status) * 100)}%`;
  const rate = status.downloadRate || 0;
  return rate > 0 ? `${percent} · ${formatBytes(rate)}/s` : percent;
}

/** 0..1: of the weights loaded, or while Downloading of the bytes this node lacked. */
function shardProgress(status) {
  const done = status?.phase === 'Downloading'
    ? (status.bytesToDownload > 0 ? (status.bytesDownloaded || 0) / status.bytesToDownload : 0)
    : status?.progress ?? 0;
  return Math.max(0, Math.min(1, done));
}

function segment(shard, colour) {
  const spec = shard.spec;
  const total = spec.totalLayers || 1;
  const phase = shard.status?.phase || 'Pending';
  const progress = shardProgress(shard.status);
  const left = (spec.layers.start / total) * 100;
  const width = ((spec.layers.end - spec.layers.start) / total) * 100;
  const layers = `layers ${spec.layers.start}–${spec.layers.end - 1}`;
  const detail = shardDetail(shard.status);
  const fetched = phase === 'Downloading' && shard.status.bytesToDownload
    ? `\n${formatBytes(shard.status.bytesDownloaded || 0)} of ${formatBytes(shard.status.bytesToDownload)} fetched` : '';
  const title = `${shard.metadata.name}\nnode ${spec.nodeName}\n${layers} of ${total}\n${detail}${fetched}`
    + (shard.status?.message ? `\n${shard.status.message}` : '');
  return h('div', {
    class: `segment phase-${phase.toLowerCase()}`, title,
    dataset: { shard: shard.metadata.name, node: spec.nodeName, phase },
    style: { left: `${left}%`, width: `${width}%`, '--node': colour },
  },
  phase === 'Loading' || phase === 'Downloading'
    ? h('div', { class: 'segment-progress', style: { width: `${progress * 100}%` } }) : null,
  h('div', { class: 'segment-text' },
    h('span', { class: 'segment-node' }, spec.nodeName),
    h('span', { class: 'segment-detail' }, ` ${spec.layers.start}–${spec.layers.end - 1} · ${detail}`)));
}

export function renderShardMap(deployments, shards, { colours }) {
  const byDeployment = new Map(deployments.map((md) => [deploymentKey(md), []]));
  for (const shard of shards) {
    const key = shard.spec.deployment;
    if (!byDeployment.has(key)) byDeployment.set(key, []);
    byDeployment.get(key).push(shard);
  }
  if (!byDeployment.size) return empty('Nothing is placed yet.');
  const used = [...new Set(shards.map((s) => s.spec.nodeName))].sort();
  const legend = used.length ? h('div', { class: 'legend' },
    used.map((name) => h('span', { class: 'legend-item' },
      h('span', { class: 'swatch', style: { background: colours.get(name) || '#94a3b8' } }), name)),
    h('span', { class: 'legend-item muted' }, h('span', { class: 'swatch hatched' }), 'pending'),
    h('span', { class: 'legend-item muted' }, h('span', { class: 'swatch failed' }), 'failed')) : null;

  const blocks = [...byDeployment.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([key, list]) => {
    const replicas = new Map();
    for (const shard of list) {
      if (!replicas.has(shard.spec.replica)) replicas.set(shard.spec.replica, []);
      replicas.get(shard.spec.replica).push(shard);
    }
    const total = Math.max(0, ...list.map((s) => s.spec.totalLayers || 0));
    const ready = list.filter((s) => s.status?.phase === 'Ready').length;
    const rows = [...replicas.entries()].sort(([a], [b]) => a - b).map(([replica, parts]) =>
      h('div', { class: 'replica', dataset: { replica: String(replica) } },
        h('div', { class: 'replica-label muted' }, `replica ${replica}`),
        h('div', { class: 'layer-bar' },
          parts.sort((a, b) => a.spec.index - b.spec.index).map((s) => segment(s, colours.get(s.spec.nodeName))))));
    return h('div', { class: 'shard-deployment', dataset: { deployment: key } },
      h('div', { class: 'shard-head' },
        h('span', { class: 'name' }, key),
        list.length
          ? h('span', { class: 'muted' }, `${total} layers · ${list.length} shard${list.length === 1 ? '' : 's'} · ${ready} ready`)
          : h('span', { class: 'muted' }, 'not placed')),
      rows.length ? rows : null,
      rows.length ? h('div', { class: 'axis muted' }, h('span', {}, '0'), h('span', {}, String(total))) : null);
  });
  return h('div', {}, legend, blocks);
}

// --- Throughput sparkline ----------------------------------------------------------------------

export function renderSparkline(svg, samples) {
  svg.replaceChildren();
  if (samples.length < 2) return;
  const max = Math.max(1, ...samples);
  const step = 120 / (samples.length - 1);
  const points = samples.map((v, i) => `${(i * step).toFixed(1)},${(31 - (v / max) * 29).toFixed(1)}`);
  svg.append(h('path', { class: 'spark-area', d: `M0,32 L${points.join(' L')} L120,32 Z` }),
    h('polyline', { class: 'spark-line', points: points.join(' ') }));
}
