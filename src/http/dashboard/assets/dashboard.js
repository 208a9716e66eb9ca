// The dashboard: polls the documented JSON API with the session cookie and renders the
// panel in view. Data goes into the page as text (textContent), never as HTML.
// State-changing calls send the session's CSRF token (X-CSRF-Token).
'use strict';

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const CHAOS = document.querySelector('meta[name="chaos"]').content === 'true';
const $ = (sel) => document.querySelector(sel);

// ---- helpers ---------------------------------------------------------------------

async function api(method, path) {
  const headers = { 'Accept': 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = CSRF;
  const res = await fetch(path, { method, headers, credentials: 'same-origin' });
  if (res.status === 401) { location.assign('/dashboard/login'); throw new Error('signed out'); }
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new Error((body && (body.detail || body.title)) || `${res.status}`);
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

const fmt = (n) => (n === null || n === undefined) ? '–' : Number(n).toLocaleString('en');
const ms = (n) => (n === null || n === undefined) ? '–' : Number(n).toFixed(1);
const when = (t) => t ? new Date(t).toLocaleString() : '–';
const short = (id) => String(id).slice(0, 8) + '…' + String(id).slice(-4);

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colSpan: 8, class: 'empty' }, empty))]));
}

function status(text, bad) {
  const s = $('#status');
  s.textContent = text;
  s.className = bad ? 'status bad' : 'status';
}

async function act(method, path, what) {
  try {
    await api(method, path);
    status(what);
  } catch (e) {
    status(`${what} failed: ${e.message}`, true);
  }
  refresh();
}

// ---- charts (inline SVG) ----------------------------------------------------------

const SVG = 'http://www.w3.org/2000/svg';
function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function lineChart(svg, points, series) {
  const W = 800, H = 180, pad = 12;
  const max = Math.max(1, ...points.flatMap((p) => series.map((s) => p[s.key])));
  const x = (i) => pad + (points.length > 1 ? i * (W - 2 * pad) / (points.length - 1) : 0);
  const y = (v) => H - pad - v * (H - 2 * pad) / max;
  const parts = [svgEl('line', { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, class: 'axis' })];
  for (const s of series) {
    const d = points.map((p, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(p[s.key]).toFixed(1)}`).join(' ');
    if (d) parts.push(svgEl('path', { d, class: `line ${s.cls}` }));
  }
  svg.replaceChildren(...parts);
  return max;
}

// One slot per hour of the last 7 days, the newest on the right.
function barChart(svg, hours) {
  const W = 800, H = 140, pad = 8, SLOTS = 7 * 24;
  const now = Math.floor(Date.now() / 3600000);
  const max = Math.max(1, ...hours.map((h) => h.processed + h.failed));
  const bw = (W - 2 * pad) / SLOTS;
  const parts = [svgEl('line', { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, class: 'axis' })];
  for (const h of hours) {
    const slot = SLOTS - 1 - (now - Math.floor(Date.parse(h.hour) / 3600000));
    if (slot < 0 || slot >= SLOTS) continue;
    const ph = h.processed * (H - 2 * pad) / max, fh = h.failed * (H - 2 * pad) / max;
    const title = svgEl('title', {});
    title.textContent = `${when(h.hour)}: ${h.processed} processed, ${h.failed} failed`;
    const g = svgEl('g', {});
    const x = pad + slot * bw;
    g.append(title,
      svgEl('rect', { x, y: H - pad - ph, width: Math.max(bw - 1, 1), height: ph, class: 'bar processed' }),
      svgEl('rect', { x, y: H - pad - ph - fh, width: Math.max(bw - 1, 1), height: fh, class: 'bar failed' }));
    parts.push(g);
  }
  svg.replaceChildren(...parts);
  return max;
}

// ---- panels -----------------------------------------------------------------------

const SETS = { retries: 'Retries', scheduled: 'Scheduled', dead: 'Dead' };
const view = { panel: 'overview', set: { q: '', cursor: null }, queue: null, queueCursor: null, tenantsCursor: null, analyticsTenant: null };

const panels = {
  overview(stats) {
    const top = lineChart($('#chart-live'), stats.series, [
      { key: 'processed_per_second', cls: 'processed' },
      { key: 'failed_per_second', cls: 'failed' },
    ]);
    const last = stats.series[stats.series.length - 1];
    $('#live-legend').textContent = last
      ? `now ${last.processed_per_second.toFixed(1)} processed/s (green), ${last.failed_per_second.toFixed(1)} failed/s (red); top of the chart ${top.toFixed(0)}/s`
      : 'collecting…';
    const busiest = barChart($('#chart-history'), stats.history);
    $('#history-legend').textContent = `processed (green) / failed (red) per hour, the last 7 days of this process; busiest hour ${fmt(busiest)}`;
    fill($('#kinds tbody'), stats.kinds.map((k) => el('tr', {},
      el('td', {}, k.kind), el('td', {}, fmt(k.succeeded)), el('td', {}, fmt(k.failed)),
      el('td', {}, ms(k.p50_ms)), el('td', {}, ms(k.p95_ms)), el('td', {}, ms(k.p99_ms)))), 'No jobs ran in this window.');
  },

  async queues() {
    const jobs = await api('GET', '/v1/admin/jobs');
    fill($('#queues tbody'), jobs.queues.map((q) => el('tr', { 'data-queue': q.name },
      el('td', {}, q.name), el('td', {}, fmt(q.size)), el('td', {}, `${fmt(q.latency_ms)} ms`),
      el('td', {}, el('button', { type: 'button', on: { click: () => { view.queue = q.name; view.queueCursor = null; refresh(); } } }, 'Jobs'),
        el('button', { type: 'button', class: 'danger', on: { click: () => confirm(`Delete every job in ${q.name}?`) && act('DELETE', `/v1/admin/jobs/queues/${encodeURIComponent(q.name)}`, `Cleared ${q.name}`) } }, 'Clear')))),
    'No queues yet.');
    $('#queue-jobs').hidden = !view.queue;
    if (!view.queue) return;
    $('#queue-name').textContent = view.queue;
    const page = await api('GET', `/v1/admin/jobs/queues/${encodeURIComponent(view.queue)}?limit=25${view.queueCursor ? `&cursor=${view.queueCursor}` : ''}`);
    fill($('#queue-jobs tbody'), page.items.map((j) => el('tr', {},
      el('td', { title: j.id }, short(j.id)), el('td', {}, j.kind), el('td', { class: 'args' }, JSON.stringify(j.args)), el('td', {}, when(j.enqueued_at)))),
    'The queue is empty.');
    const next = $('#queue-next');
    next.hidden = !page.next_cursor;
    next.onclick = () => { view.queueCursor = page.next_cursor; refresh(); };
  },

  async busy() {
    const page = await api('GET', '/v1/admin/jobs/running?limit=200');
    fill($('#busy tbody'), page.items.map((j) => el('tr', {},
      el('td', {}, j.worker || '–'), el('td', { title: j.id }, short(j.id)), el('td', {}, j.kind),
      el('td', {}, when(j.started_at)), el('td', {}, fmt(j.attempts)))), 'No job is running.');
  },

  async set(name) {
    $('#set-title').textContent = SETS[name];
    const q = view.set.q ? `&q=${encodeURIComponent(view.set.q)}` : '';
    const cursor = view.set.cursor ? `&cursor=${view.set.cursor}` : '';
    const page = await api('GET', `/v1/admin/jobs/${name}?limit=25${q}${cursor}`);
    const button = (label, method, path, cls) => el('button', {
      type: 'button', class: cls, 'data-action': label.toLowerCase().replace(' now', ''),
      on: { click: () => act(method, path, `${label}: done`) },
    }, label);
    fill($('#set tbody'), page.items.map((j) => el('tr', { 'data-job-id': j.id },
      el('td', { title: j.id }, short(j.id)), el('td', {}, j.kind), el('td', {}, `${j.attempts} / ${j.max_attempts}`),
      el('td', { class: 'error-text' }, j.last_error || ''),
      el('td', {}, when(name === 'dead' ? j.finished_at : j.run_at)),
      el('td', { class: 'actions' },
        button('Retry now', 'POST', `/v1/admin/jobs/${j.id}/retry`),
        name !== 'dead' ? button('Kill', 'POST', `/v1/admin/jobs/${j.id}/kill`, 'danger') : null,
        button('Delete', 'DELETE', `/v1/admin/jobs/${j.id}`, 'danger')))), `No ${name} jobs${view.set.q ? ' match' : ''}.`);
    const next = $('#set-next');
    next.hidden = !page.next_cursor;
    next.onclick = () => { view.set.cursor = page.next_cursor; refresh(); };
    $('#set-retry-all').onclick = () => confirm(`Retry every job in ${name}?`) && act('POST', `/v1/admin/jobs/${name}/retry`, `Retried all ${name}`);
    const killAll = $('#set-kill-all');
    killAll.hidden = name === 'dead';
    killAll.onclick = () => confirm(`Move every job in ${name} to the dead set?`) && act('POST', `/v1/admin/jobs/${name}/kill`, `Killed all ${name}`);
    $('#set-delete-all').onclick = () => confirm(`Delete every job in ${name}?`) && act('DELETE', `/v1/admin/jobs/${name}`, `Deleted all ${name}`);
  },

  async pipeline(stats) {
    const p = stats.pipeline;
    const figures = [
      ['Relay lag', p.relay_lag_seconds === null ? '–' : `${p.relay_lag_seconds.toFixed(2)} s`],
      ['Effect lag (job queue)', p.effect_lag_seconds === null ? '–' : `${p.effect_lag_seconds.toFixed(2)} s`],
      ['Published', `${p.published_per_second.toFixed(1)}/s`],
      ['Consumed', `${p.consumed_per_second.toFixed(1)}/s`],
      ['Parked', `${p.parked_per_second.toFixed(2)}/s`],
    ];
    $('#pipeline').replaceChildren(...figures.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
    const dlq = await api('GET', '/v1/admin/dlq?limit=100');
    fill($('#dlq tbody'), dlq.items.map((m) => el('tr', { 'data-message-id': m.id },
      el('td', { title: m.id }, short(m.id)), el('td', {}, m.routing_key), el('td', { class: 'error-text' }, m.reason),
      el('td', {}, fmt(m.delivery_count)),
      el('td', { class: 'actions' },
        el('button', { type: 'button', 'data-action': 'replay', on: { click: () => act('POST', `/v1/admin/dlq/${encodeURIComponent(m.id)}/replay`, 'Replayed') } }, 'Replay'),
        el('button', { type: 'button', class: 'danger', 'data-action': 'discard', on: { click: () => confirm('Discard this message for good?') && act('DELETE', `/v1/admin/dlq/${encodeURIComponent(m.id)}`, 'Discarded') } }, 'Discard')))),
    'Nothing is parked.');
  },

  events(stats) {
    fill($('#events tbody'), stats.events.map((e) => el('tr', {},
      el('td', {}, e.type), el('td', {}, fmt(e.consumed)), el('td', {}, e.per_second.toFixed(2)),
      el('td', {}, ms(e.p50_ms)), el('td', {}, ms(e.p95_ms)), el('td', {}, ms(e.p99_ms)))), 'No events consumed in this window.');
  },

  async tenants(stats) {
    $('#active-tenants').textContent = `${fmt(stats.active_tenants)} with a running manager in this process`;
    const busiest = await api('GET', `/v1/admin/stats/tenants?window=${$('#window').value}&limit=20`);
    fill($('#tenant-activity tbody'), busiest.items.map((t) => el('tr', {
      'data-tenant-id': t.tenant_id, class: t.tenant_id === view.analyticsTenant?.id ? 'selected' : null,
      on: { click: () => { view.analyticsTenant = { id: t.tenant_id, slug: t.slug }; refresh(); } } },
      el('td', {}, t.slug), el('td', {}, t.name), el('td', {}, fmt(t.user_count)),
      el('td', {}, fmt(t.events)), el('td', {}, t.per_second.toFixed(2)))), 'No events in this window.');
    // The chosen tenant's analytics (the busiest one until an operator picks another).
    const pick = view.analyticsTenant || (busiest.items[0] && { id: busiest.items[0].tenant_id, slug: busiest.items[0].slug });
    $('#analytics-tenant').textContent = pick ? pick.slug : '–';
    if (pick) {
      const from = new Date(Date.now() - $('#window').value * 1000).toISOString();
      const a = await api('GET', `/v1/tenants/${pick.id}/analytics/events?bucket=minute&from=${encodeURIComponent(from)}`);
      fill($('#tenant-analytics tbody'), a.types.map((t) => el('tr', { 'data-type': t.type },
        el('td', {}, t.type), el('td', {}, fmt(t.count)), el('td', {}, t.events_per_second.toFixed(2)),
        el('td', {}, ms(t.latency_ms.p50)), el('td', {}, ms(t.latency_ms.p95)), el('td', {}, ms(t.latency_ms.p99)))),
      'No events processed in this window.');
    } else {
      fill($('#tenant-analytics tbody'), [], 'No tenant with events in this window.');
    }
    const page = await api('GET', `/v1/tenants?limit=50${view.tenantsCursor ? `&cursor=${encodeURIComponent(view.tenantsCursor)}` : ''}`);
    fill($('#tenants tbody'), page.items.map((t) => el('tr', {},
      el('td', {}, t.slug), el('td', {}, t.name), el('td', {}, fmt(t.user_count)),
      el('td', {}, t.max_users ? fmt(t.max_users) : 'no limit'), el('td', {}, when(t.created_at)))), 'No tenants yet.');
    const next = $('#tenants-next');
    next.hidden = !page.next_cursor;
    next.onclick = () => { view.tenantsCursor = page.next_cursor; refresh(); };
  },

  async webhooks() {
    const page = await api('GET', `/v1/admin/stats/webhooks?window=${$('#window').value}&limit=100`);
    fill($('#webhooks tbody'), page.items.map((w) => el('tr', { 'data-endpoint-id': w.endpoint_id },
      el('td', {}, w.slug), el('td', { class: 'args' }, w.url), el('td', {}, w.status),
      el('td', {}, fmt(w.attempts)), el('td', {}, fmt(w.failed)),
      el('td', { class: w.failure_rate > 0.5 ? 'error-text' : '' }, `${(w.failure_rate * 100).toFixed(1)} %`))),
    'No deliveries in this window.');
  },

  async tree() {
    const root = await api('GET', '/debug/actors');
    const node = (n) => el('li', { 'data-actor': n.name, class: `actor ${n.status}` },
      el('span', { class: 'name' }, n.name),
      el('span', { class: 'badge' }, n.status),
      n.kind === 'supervisor' ? el('span', { class: 'meta' }, n.strategy || 'supervisor') : null,
      n.restarts ? el('span', { class: 'meta warn' }, `${n.restarts} restarts`) : null,
      n.mailbox ? el('span', { class: 'meta' }, `mailbox ${n.mailbox}`) : null,
      n.last_failure ? el('span', { class: 'meta error-text', title: n.last_failure }, `last failure: ${n.last_failure}`) : null,
      CHAOS && n.name !== 'root' ? el('button', { type: 'button', class: 'danger small', 'data-action': 'kill',
        on: { click: () => confirm(`Kill ${n.name}?`) && act('POST', `/debug/actors/${encodeURIComponent(n.name)}/kill`, `Killed ${n.name}`) } }, 'Kill') : null,
      n.children && n.children.length ? el('ul', {}, n.children.map(node)) : null);
    $('#tree').replaceChildren(node(root));
  },
};

// ---- the poll loop ----------------------------------------------------------------

let timer = null;
let running = false;

async function refresh() {
  if (running) return;
  running = true;
  clearTimeout(timer);
  try {
    const windowSecs = $('#window').value;
    const stats = await api('GET', `/v1/admin/stats?window=${windowSecs}`);
    for (const [k, v] of Object.entries(stats.counts)) {
      const e = document.getElementById(`count-${k}`);
      if (e) e.textContent = fmt(v);
    }
    document.querySelectorAll('.window-label').forEach((e) => { e.textContent = `last ${$('#window').selectedOptions[0].text}`; });
    const p = view.panel;
    if (SETS[p]) await panels.set(p);
    else await panels[p](stats);
    document.body.dataset.refreshed = String(Date.now());
    if ($('#status').className === 'status bad' && $('#status').textContent.startsWith('Cannot reach')) status('');
  } catch (e) {
    if (e.message !== 'signed out') status(`Cannot reach the server: ${e.message}`, true);
  } finally {
    running = false;
    const every = Number($('#poll').value);
    if (every > 0) timer = setTimeout(refresh, every);
  }
}

function show() {
  const name = (location.hash || '#overview').slice(1);
  const panel = panels[name] || SETS[name] ? name : 'overview';
  if (panel !== view.panel) { view.set = { q: '', cursor: null }; $('#set-q').value = ''; }
  view.panel = panel;
  document.querySelectorAll('.panel').forEach((s) => { s.hidden = true; });
  (SETS[panel] ? $('#panel-set') : $(`#panel-${panel}`)).hidden = false;
  document.querySelectorAll('#tabs a').forEach((a) => a.classList.toggle('active', a.hash === `#${panel}`));
  refresh();
}

$('#set-search').addEventListener('submit', (e) => {
  e.preventDefault();
  view.set = { q: $('#set-q').value.trim(), cursor: null };
  refresh();
});
$('#poll').addEventListener('change', refresh);
$('#window').addEventListener('change', refresh);
$('#sign-out').addEventListener('click', async () => {
  await api('POST', '/dashboard/logout').catch(() => null);
  location.assign('/dashboard/login');
});
window.addEventListener('hashchange', show);
show();
