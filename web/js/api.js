// How the console talks to its server. Two modes, one code base:
//  fleet: served by the user's master; node NODE of job JOB is reached under /api/fleet/JOB/NODE
//  node:  served by one agent for its own node; the API is at the root.

export const session = { mode: 'fleet', user: '', csrf: null, csrfHeader: 'X-CSRF-Token', job: null, node: null };

export class ApiError extends Error {
  constructor(status, error, message) {
    super(message || error || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }

  // What this error means for a node's page: lost (agent unreachable), gone (job ended), or other.
  get kind() {
    if (this.status === 0 || this.status === 502 || this.status === 504) return 'lost';
    if (this.status === 404 && /no agent/.test(this.message)) return 'gone';
    if (this.status === 401) return 'session';
    return 'error';
  }
}

export async function loadConfig() {
  const resp = await fetch('config.json', { credentials: 'same-origin', cache: 'no-store' });
  if (resp.status === 401 || resp.redirected) {
    // not logged in (any more): /console/ leads to the login page, on the master and on an agent
    window.location.assign('/console/');
    throw new ApiError(401, 'unauthorized', 'not logged in');
  }
  if (!resp.ok) throw new ApiError(resp.status, 'config', 'cannot load the console configuration');
  const cfg = await resp.json();
  Object.assign(session, { mode: cfg.mode, user: cfg.user, csrf: cfg.csrf, csrfHeader: cfg.csrf_header || 'X-CSRF-Token',
    job: cfg.job || null, node: cfg.node || null, version: cfg.version });
  return cfg;
}

// Path prefix for one node's agent API.
export function nodeBase(job, node) {
  if (session.mode === 'node') return '';
  return `/api/fleet/${encodeURIComponent(job)}/${encodeURIComponent(node)}`;
}

export function withQuery(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) q.set(k, String(v));
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

export function unsafeHeaders(headers = {}) {
  if (session.csrf) headers[session.csrfHeader] = session.csrf;
  return headers;
}

export async function api(path, { method = 'GET', json, body, headers = {}, signal } = {}) {
  const init = { method, headers: { ...headers }, credentials: 'same-origin', signal, cache: 'no-store' };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  } else if (body !== undefined) {
    init.body = body;
  }
  if (method !== 'GET' && method !== 'HEAD') unsafeHeaders(init.headers);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'the server cannot be reached');
  }
  if (!resp.ok) throw await errorOf(resp);
  const type = resp.headers.get('Content-Type') || '';
  if (type.includes('application/json')) return resp.json();
  return resp.text();
}

export async function errorOf(resp) {
  let error = '';
  let message = '';
  try {
    const data = await resp.json();
    error = data.error || '';
    message = data.message || data.error || '';
  } catch (_) {
    message = resp.statusText;
  }
  if (resp.status === 401 && session.mode === 'fleet' && !message.includes('token')) {
    message = 'your session has ended: run `dxflow console` for a new login link';
  }
  return new ApiError(resp.status, error, message);
}

export async function logout() {
  const path = session.mode === 'fleet' ? '/logout' : '/console/logout';
  try {
    await fetch(path, { method: 'POST', credentials: 'same-origin', headers: unsafeHeaders({}) });
  } finally {
    window.location.assign(session.mode === 'fleet' ? '/login' : '/console/');
  }
}

export function wsUrl(path) {
  const proto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${window.location.host}${path}`;
}
