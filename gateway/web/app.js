// tidings web page: sign in, a live inbox, a coupon drop and chat rooms, on the gateway's own API only.
// Plain DOM code, no framework, no build step. All text from users goes in through textContent.
//
// Delivery: one EventSource on /v1/stream with the stream cookie from POST /v1/session (a
// credential that opens streams only and lives minutes: renewed whenever the stream has to
// reconnect, and when the browser's own reconnect was refused with it). The id of the
// last event seen is kept in sessionStorage, and a new EventSource (after a reload) starts from
// it with ?last_event_id=, so nothing sent while the page was away is lost; the browser itself
// sends Last-Event-ID on its own reconnects (gateway restarts), which the gateway prefers to the
// query. Whatever may arrive twice (a resume overlapping an inbox or history page) is
// deduplicated: notifications by id, messages by message_id.
//
// One gap that leaves: a notification the stream delivered before the store had it is past the
// saved id but may not be in the inbox page a reload fetches. So the live ones are kept too (the
// last RECENT_MAX, in sessionStorage) and put back in after the inbox page until the store has them.

const $ = (id) => document.getElementById(id);
const TOKEN = 'tidings.token';
const LAST_ID = 'tidings.lastEventId';
const RECENT = 'tidings.recentLive';
const RECENT_MAX = 50;

const state = {
  token: null,
  user: null,
  kinds: [],
  chat: true, // false when the gateway has no chat API (GET /v1/rooms answers 404)
  prefsLocale: false, // the gateway's preferences have a `locale` (sent back on save)
  es: null,
  inbox: new Map(), // notification id -> item
  inboxCursor: null,
  unread: 0,
  rooms: new Map(), // room_id -> room (mine)
  sessionAt: 0, // when the stream cookie was last renewed (ms)
  retriedPosition: false, // the stream closed once since it last opened; kept its position then
  room: null, // the open room: { id, info, messages: Map(message_id -> message), before, maxSeq }
  searchTags: [],
  searchCursor: null,
  couponsApi: true, // false when the gateway has no coupon API (GET /v1/coupons answers 404)
  coupons: new Map(), // coupon id -> { info, li, claim: see claimCoupon, checked }
  admin: false, // GET /v1/status answered 200: the Status view is shown
};

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('data-') || k.startsWith('aria-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function announce(text) {
  $('announce').textContent = text;
}

/** Microseconds, milliseconds or RFC 3339 -> a short local time. */
function fmtTime(v) {
  if (v == null) return '';
  let d;
  if (typeof v === 'number') d = new Date(v > 1e14 ? v / 1000 : v);
  else d = new Date(v);
  if (Number.isNaN(d.getTime())) return '';
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : d.toLocaleString();
}

/** "p.o" -> [p, o] (stream positions order by offset within the user's partition). */
function pos(p) {
  const [a, b] = String(p || '').split('.');
  return [Number(a) || 0, Number(b) || 0];
}
const newer = (a, b) => {
  const [pa, oa] = pos(a);
  const [pb, ob] = pos(b);
  return pa !== pb ? pa > pb : oa > ob;
};

function tagsOf(text) {
  return [...new Set(text.split(/[\s,]+/).map((t) => t.trim().toLowerCase()).filter(Boolean))];
}

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    Object.assign(this, { status, code, retryAfter });
  }
}

async function api(method, path, body, { attempt = 0, headers: extra = {} } = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...extra };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) {
    signOut('The token is no longer valid: sign in again.');
    throw new ApiError(401, 'unauthorized', 'signed out');
  }
  // Briefly unavailable (a history page waiting for the store, the broker away): a read is
  // safe to ask again after the Retry-After the gateway gives.
  if (r.status === 503 && method === 'GET' && attempt < 5) {
    const secs = Math.min(Number(r.headers.get('Retry-After')) || 1, 3);
    await new Promise((res) => setTimeout(res, secs * 1000));
    return api(method, path, body, { attempt: attempt + 1, headers: extra });
  }
  if (!r.ok) {
    let err = {};
    try {
      err = (await r.json()).error || {};
    } catch {
      /* not JSON */
    }
    throw new ApiError(r.status, err.code, err.message || `${r.status} ${r.statusText}`, r.headers.get('Retry-After'));
  }
  return r.status === 204 ? null : r.json();
}

/** Runs `fn` at most once per `ms`, trailing: many stream events, one refetch. */
function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID(); // only in secure contexts (https, localhost)
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function debounce(fn, ms) {
  let t = null;
  return () => {
    clearTimeout(t);
    t = setTimeout(fn, ms);
  };
}

// ---------------------------------------------------------------------------------------------
// Sign in and out

function userOf(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).sub || null;
  } catch {
    return null;
  }
}

async function signIn(token) {
  $('signin-error').textContent = '';
  // The session cookie EventSource sends; a 401 here also tells us the token is no good.
  const r = await fetch('/v1/session', { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
  if (r.status !== 204) {
    let msg = `${r.status}`;
    try {
      msg = (await r.json()).error.message;
    } catch {
      /* keep the status */
    }
    throw new Error(`Sign-in refused: ${msg}`);
  }
  state.sessionAt = Date.now();
  state.token = token;
  state.user = userOf(token);
  sessionStorage.setItem(TOKEN, token);
  $('who').textContent = `Signed in as ${state.user}`;
  show(true);
  await Promise.all([loadInbox(), loadRooms(), probeCoupons(), probeStatus()]);
  openStream();
  route();
}

function signOut(message = '') {
  if (state.es) state.es.close();
  state.es = null;
  fetch('/v1/session', { method: 'DELETE' }).catch(() => {});
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(LAST_ID);
  sessionStorage.removeItem(RECENT);
  Object.assign(state, { token: null, user: null, unread: 0, room: null, inboxCursor: null, retriedPosition: false });
  state.inbox.clear();
  state.rooms.clear();
  state.coupons.clear();
  clearTimeout(couponTimer);
  clearTimeout(statusTimer);
  state.admin = false;
  $('tab-status').hidden = true;
  $('status-body').replaceChildren();
  $('inbox-list').replaceChildren();
  $('coupon-list').replaceChildren();
  $('room-list').replaceChildren();
  $('search-results').replaceChildren();
  $('messages').replaceChildren();
  setConn('offline', 'Signed out');
  show(false);
  $('signin-error').textContent = message;
}

/** A new stream cookie (a 401 signs out, see api). At most every 30 s unless `now`. */
async function renewSession(now = false) {
  if (!state.token || (!now && Date.now() - state.sessionAt < 30000)) return;
  state.sessionAt = Date.now();
  await api('POST', '/v1/session');
}

/** Before the browser reconnects on its own (after `retry:`), so it carries a fresh cookie. */
function renewBeforeReconnect() {
  renewSession().catch(() => {});
}

function show(signedIn) {
  $('signin').hidden = signedIn;
  $('app').hidden = !signedIn;
  $('who').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
}

// ---------------------------------------------------------------------------------------------
// The stream

function setConn(s, text) {
  const c = $('conn');
  c.dataset.state = s;
  c.textContent = text;
}

function openStream() {
  if (state.es) state.es.close();
  // Resume after the last event this tab saw; else after the newest inbox item (so what came in
  // between the inbox page and the stream is not missed); else from now.
  let from = sessionStorage.getItem(LAST_ID);
  if (!from) {
    for (const it of state.inbox.values()) if (!from || newer(it.position, from)) from = it.position;
  }
  const url = from ? `/v1/stream?last_event_id=${encodeURIComponent(from)}` : '/v1/stream';
  const es = new EventSource(url, { withCredentials: true });
  state.es = es;
  setConn('connecting', 'Connecting…');
  es.addEventListener('open', () => {
    state.retriedPosition = false;
    setConn('live', 'Live');
  });
  es.addEventListener('error', () => {
    if (es.readyState === EventSource.CLOSED) streamClosed(es);
    else {
      renewBeforeReconnect();
      setConn('reconnecting', 'Reconnecting…');
    }
  });
  // The gateway cannot serve us this moment (starting, moving partitions): the browser retries.
  es.addEventListener('unavailable', (e) => {
    remember(e);
    renewBeforeReconnect();
    setConn('reconnecting', 'Reconnecting…');
  });
  es.addEventListener('reconnect', (e) => {
    remember(e);
    renewBeforeReconnect();
    setConn('reconnecting', 'Reconnecting…');
  });
  es.addEventListener('close', (e) => {
    const why = safeJson(e.data).reason;
    if (why === 'too_many_connections') {
      es.close();
      setConn('closed', 'Closed: open in too many tabs');
    } else {
      renewBeforeReconnect();
      setConn('reconnecting', 'Reconnecting…');
    }
  });
  // We missed more than the gateway can replay: refetch everything, then carry on.
  es.addEventListener('reset', (e) => {
    remember(e);
    refetchAll();
  });
  // A resume came from the store, which keeps inbox rows but not chat copies: refetch the rooms.
  es.addEventListener('resync', () => refetchAll());
  for (const kind of state.kinds) {
    es.addEventListener(kind, (e) => {
      remember(e);
      const data = safeJson(e.data);
      if (kind.startsWith('chat.')) {
        onChatEvent(kind, data);
        return;
      }
      // A claim's rejection the coupon drop shows is read out from there; others from here.
      const shown = kind.startsWith('coupon.') && onCouponEvent(kind, data);
      if (!DELIVERY_ONLY.has(kind)) onNotification(data);
      else if (!shown) announce(`${data.title}: ${data.body}`);
    });
  }
}

function remember(e) {
  if (e.lastEventId) sessionStorage.setItem(LAST_ID, e.lastEventId);
}

function safeJson(s) {
  try {
    return JSON.parse(s) || {};
  } catch {
    return {};
  }
}

/** EventSource gave up (401, 422, 500). Renew the stream cookie (a refused token signs out),
 * then try the same position once more (the cookie had expired: a 401); if that closes too before
 * opening, the position may be unknown to the gateway (422): start from the inbox. */
async function streamClosed(es) {
  if (state.es !== es) return;
  setConn('reconnecting', 'Reconnecting…');
  try {
    await renewSession(true);
  } catch {
    return;
  }
  const fresh = state.retriedPosition;
  state.retriedPosition = true;
  if (fresh) sessionStorage.removeItem(LAST_ID);
  setTimeout(
    () => {
      if (state.es === es && state.token) {
        if (fresh) refetchAll();
        openStream();
      }
    },
    fresh ? 2000 : 0,
  );
}

async function refetchAll() {
  await Promise.all([loadInbox(), loadRooms()]);
  if (state.room) openRoom(state.room.id, { keepScroll: true });
}

// ---------------------------------------------------------------------------------------------
// Inbox

async function loadInbox() {
  const [page, count] = await Promise.all([
    api('GET', '/v1/notifications?limit=20'),
    api('GET', '/v1/notifications/unread_count'),
  ]);
  state.inbox.clear();
  $('inbox-list').replaceChildren();
  for (const it of page.items) addInboxItem(it, false);
  state.inboxCursor = page.next_cursor;
  state.unread = count.unread;
  // Live notifications this tab saw that the store did not have yet (see the top of this file).
  const newest = page.items.length ? page.items[0].position : null;
  // Older than the page's newest: stored (the store keeps a partition's order), so dropped here.
  const recent = loadRecent().filter((it) => !state.inbox.has(it.id) && (!newest || newer(it.position, newest)));
  for (const it of recent) {
    addInboxItem(it, true);
    if (!it.read) state.unread += 1;
  }
  saveRecent(recent);
  renderInboxMeta();
}

function loadRecent() {
  try {
    return JSON.parse(sessionStorage.getItem(RECENT)) || [];
  } catch {
    return [];
  }
}

function saveRecent(items) {
  sessionStorage.setItem(RECENT, JSON.stringify(items.slice(-RECENT_MAX)));
}

async function loadMoreInbox() {
  if (!state.inboxCursor) return;
  const page = await api('GET', `/v1/notifications?limit=20&cursor=${encodeURIComponent(state.inboxCursor)}`);
  for (const it of page.items) addInboxItem(it, false);
  state.inboxCursor = page.next_cursor;
  renderInboxMeta();
}

function onNotification(n) {
  if (!n.id || state.inbox.has(n.id)) return; // seen already (a resume replays from a position)
  n.read = false;
  addInboxItem(n, true);
  saveRecent([...loadRecent(), n]);
  state.unread += 1;
  renderInboxMeta();
  announce(`New notification: ${n.title}`);
}

/** When, what kind and under which category (what a user opts out of): `10:50 AM · campaign · campaigns`. */
function itemMeta(it) {
  return [fmtTime(it.occurred_at), it.kind, it.category].filter(Boolean).join(' · ');
}

/** Inserts an item in position order (newest first); `live` ones are new to the server's count. */
function addInboxItem(it, live) {
  if (state.inbox.has(it.id)) return;
  state.inbox.set(it.id, it);
  const li = el(
    'li',
    {
      class: it.read ? '' : 'unread',
      'data-id': it.id,
      'data-kind': it.kind,
      'data-source': it.source_event_id || '',
      'data-position': it.position,
    },
    el('span', { class: 'title', text: it.title }),
    el('span', { text: it.body }),
    el('span', { class: 'row' }, el('span', { class: 'meta', text: itemMeta(it) })),
  );
  if (!it.read) {
    const b = el('button', { type: 'button', class: 'secondary', text: 'Mark read', 'aria-label': `Mark read: ${it.title}` });
    b.addEventListener('click', () => markRead(it, li, b));
    li.querySelector('.row').append(b);
  }
  li.querySelector('.row').append(archiveButton(it, li));
  li.dataset.live = live ? '1' : '0';
  const list = $('inbox-list');
  const after = [...list.children].find((c) => newer(it.position, c.dataset.position));
  list.insertBefore(li, after || null);
}

async function markRead(it, li, button) {
  button.disabled = true;
  // A live notification can reach the page before the store has it (delivery does not wait for
  // persistence): then the server answers 404 for a moment, and trying again a little later works.
  for (let attempt = 0; ; attempt++) {
    try {
      await api('POST', `/v1/notifications/${encodeURIComponent(it.id)}/read`);
      break;
    } catch (e) {
      if (e.status !== 404 || attempt >= 10) {
        button.disabled = false;
        return;
      }
      await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
    }
  }
  if (!it.read) state.unread = Math.max(0, state.unread - 1);
  it.read = true;
  saveRecent(loadRecent().map((r) => (r.id === it.id ? { ...r, read: true } : r)));
  li.classList.remove('unread');
  // Keep focus in the list for keyboard users: on the item, since its button goes away.
  li.tabIndex = -1;
  if (document.activeElement === button) li.focus();
  button.remove();
  renderInboxMeta();
}

function renderInboxMeta() {
  const b = $('inbox-badge');
  b.textContent = String(state.unread);
  b.hidden = state.unread === 0;
  $('inbox-empty').hidden = state.inbox.size > 0;
  $('inbox-more').hidden = !state.inboxCursor;
  document.title = state.unread ? `(${state.unread}) tidings` : 'tidings';
  showCategories();
}

// ---------------------------------------------------------------------------------------------
// Inbox: mark all read, archive, and the archived list

const archived = { cursor: null };

function setUpInboxTools() {
  $('inbox-read-all').addEventListener('click', () => markAllRead().catch(() => {}));
  $('archived-more').addEventListener('click', () => loadArchived(true).catch(() => {}));
}

/** POSTs `path`; a live notification the store does not have yet answers 404 for a moment, so
 * that is asked again a little later (as markRead does). Answers the body, or throws. */
async function postStored(path, body) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api('POST', path, body);
    } catch (e) {
      if (e.status !== 404 || attempt >= 10) throw e;
      await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
    }
  }
}

/** Marks read everything up to the newest item shown: one that arrives meanwhile stays unread. */
async function markAllRead() {
  const first = $('inbox-list').firstElementChild;
  const upTo = first && state.inbox.get(first.dataset.id);
  if (!upTo) {
    $('inbox-status').textContent = 'Nothing to mark read.';
    return;
  }
  let answer;
  try {
    answer = await postStored('/v1/notifications/read_all', { up_to: upTo.id });
  } catch (e) {
    $('inbox-status').textContent = `Could not mark all read: ${e.message}`;
    return;
  }
  for (const li of $('inbox-list').children) {
    const it = state.inbox.get(li.dataset.id);
    if (!it || it.read || newer(it.position, upTo.position)) continue;
    it.read = true;
    li.classList.remove('unread');
    li.querySelector('button[aria-label^="Mark read"]')?.remove();
  }
  saveRecent(loadRecent().map((r) => (newer(r.position, upTo.position) ? r : { ...r, read: true })));
  state.unread = Math.max(0, state.unread - answer.marked);
  renderInboxMeta();
  $('inbox-status').textContent = answer.marked === 1 ? 'Marked 1 notification read.' : `Marked ${answer.marked} notifications read.`;
}

function archiveButton(it, li) {
  const b = el('button', { type: 'button', class: 'secondary', text: 'Archive', 'aria-label': `Archive: ${it.title}` });
  b.addEventListener('click', () => archiveItem(it, li, b));
  return b;
}

/** Focus for keyboard users after `li` leaves its list: the same button on a neighbour, else `heading`. */
function focusAfterRemoval(li, label, heading) {
  const next = li.nextElementSibling || li.previousElementSibling;
  const target = next?.querySelector(`button[aria-label^="${label}"]`) || $(heading);
  target.focus();
}

async function archiveItem(it, li, button) {
  // Asked before disabling: a disabled button loses the focus.
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  try {
    await postStored(`/v1/notifications/${encodeURIComponent(it.id)}/archive`);
  } catch (e) {
    button.disabled = false;
    $('inbox-status').textContent = `Could not archive: ${e.message}`;
    return;
  }
  if (hadFocus) focusAfterRemoval(li, 'Archive', 'inbox-h');
  li.remove();
  state.inbox.delete(it.id);
  if (!it.read) state.unread = Math.max(0, state.unread - 1);
  saveRecent(loadRecent().filter((r) => r.id !== it.id));
  renderInboxMeta();
  $('inbox-status').textContent = `Archived: ${it.title}`;
}

async function loadArchived(more = false) {
  const after = more && archived.cursor ? `&cursor=${encodeURIComponent(archived.cursor)}` : '';
  const page = await api('GET', `/v1/notifications?archived=true&limit=20${after}`);
  if (!more) $('archived-list').replaceChildren();
  for (const it of page.items) $('archived-list').append(archivedItem(it));
  archived.cursor = page.next_cursor;
  renderArchivedMeta();
}

function archivedItem(it) {
  const b = el('button', { type: 'button', class: 'secondary', text: 'Move to inbox', 'aria-label': `Move to inbox: ${it.title}` });
  const li = el(
    'li',
    { class: it.read ? '' : 'unread', 'data-id': it.id, 'data-source': it.source_event_id || '', 'data-position': it.position },
    el('span', { class: 'title', text: it.title }),
    el('span', { text: it.body }),
    el('span', { class: 'row' }, el('span', { class: 'meta', text: itemMeta(it) }), b),
  );
  b.addEventListener('click', () => unarchiveItem(it, li, b));
  return li;
}

async function unarchiveItem(it, li, button) {
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  try {
    await api('POST', `/v1/notifications/${encodeURIComponent(it.id)}/unarchive`);
  } catch (e) {
    button.disabled = false;
    $('archived-status').textContent = `Could not move to the inbox: ${e.message}`;
    return;
  }
  if (hadFocus) focusAfterRemoval(li, 'Move to inbox', 'archived-h');
  li.remove();
  renderArchivedMeta();
  $('archived-status').textContent = `Moved to the inbox: ${it.title}`;
  // Back in the inbox in its place, if that place is among the loaded items (else a later page).
  const last = $('inbox-list').lastElementChild;
  if (!state.inboxCursor || (last && newer(it.position, last.dataset.position))) addInboxItem({ ...it, archived: false }, false);
  if (!it.read) state.unread += 1;
  renderInboxMeta();
}

/** Unread per category, from the server. A live notification can reach the page before the store
 * has it: while the server's total differs from the badge, it is asked again (a few times). */
const categories = { behind: 0 };
function showCategories() {
  categories.behind = 0;
  refreshCategories();
}
const refreshCategories = debounce(async () => {
  if (!state.token) return;
  let counts;
  try {
    counts = await api('GET', '/v1/notifications/unread_count');
  } catch {
    return;
  }
  const parts = Object.entries(counts.by_category || {}).map(([category, n]) => `${category} ${n}`);
  $('inbox-categories').textContent = parts.length ? `Unread by category: ${parts.join(' · ')}` : '';
  $('inbox-categories').hidden = parts.length === 0;
  categories.behind = counts.unread === state.unread ? 0 : categories.behind + 1;
  if (categories.behind > 0 && categories.behind <= 10) refreshCategories();
}, 500);

function renderArchivedMeta() {
  $('archived-empty').hidden = $('archived-list').children.length > 0;
  $('archived-more').hidden = !archived.cursor;
}

// ---------------------------------------------------------------------------------------------
// Rooms

async function loadRooms() {
  let r;
  try {
    r = await api('GET', '/v1/rooms');
  } catch (e) {
    if (e.status === 404) {
      state.chat = false;
      for (const t of document.querySelectorAll('.chat-only')) t.hidden = true;
      return;
    }
    throw e;
  }
  state.chat = true;
  for (const t of document.querySelectorAll('.chat-only')) t.hidden = false;
  state.rooms.clear();
  for (const room of r.rooms) state.rooms.set(room.room_id, withLatest(room));
  renderRooms();
}
const reloadRooms = debounce(() => loadRooms().catch(() => {}), 300);

/** The seq the room's unread count covers: live messages after it are new to that count. */
function withLatest(room) {
  room.latestSeq = room.last_message ? room.last_message.seq : 0;
  return room;
}

function roomItem(room, { join } = {}) {
  const tags = el('span', { class: 'row' }, ...(room.tags || []).map((t) => el('span', { class: 'tag', text: `#${t}` })));
  const name = room.name || (room.kind === 'direct' ? `Chat about ${room.product_id}` : room.room_id);
  const li = el('li', { 'data-room-id': room.room_id, class: room.unread ? 'unread' : '' });
  const last = room.last_message;
  const body = [
    el('span', { class: 'row' }, el('span', { class: 'title', text: name }),
      room.unread ? el('span', { class: 'badge unread-count', text: String(room.unread), 'aria-label': `${room.unread} unread` }) : null),
    tags,
    el('span', { class: 'meta', text: `${room.members} member${room.members === 1 ? '' : 's'}${room.closed ? ' · closed' : ''}` }),
    last ? el('span', { class: 'meta', text: `${last.sender_id}: ${last.deleted ? '(deleted)' : last.text}` }) : null,
  ];
  if (join) {
    li.append(...body);
    const mine = state.rooms.has(room.room_id);
    const b = mine
      ? el('a', { href: `#/rooms/${encodeURIComponent(room.room_id)}`, text: 'Open' })
      : el('button', { type: 'button', text: 'Join', 'aria-label': `Join ${name}` });
    if (!mine) b.addEventListener('click', () => joinRoom(room.room_id, b));
    li.append(el('span', { class: 'row' }, b));
  } else {
    li.append(el('a', { class: 'room-link', href: `#/rooms/${encodeURIComponent(room.room_id)}` }, ...body));
  }
  return li;
}

function renderRooms() {
  const rooms = [...state.rooms.values()];
  // Most recent activity first (the server's order; live messages move a room up).
  rooms.sort((a, b) => (b._activity || 0) - (a._activity || 0));
  $('room-list').replaceChildren(...rooms.map((r) => roomItem(r)));
  $('rooms-empty').hidden = rooms.length > 0;
  const total = rooms.reduce((n, r) => n + (r.unread || 0), 0);
  const b = $('rooms-badge');
  b.textContent = String(total);
  b.hidden = total === 0;
}

async function createRoom(ev) {
  ev.preventDefault();
  $('create-error').textContent = '';
  const name = $('create-name').value.trim();
  const tags = tagsOf($('create-tags').value);
  try {
    const room = await api('POST', '/v1/rooms', { kind: 'group', name, tags });
    state.rooms.set(room.room_id, withLatest(room));
    room._activity = Date.now();
    renderRooms();
    $('create-form').reset();
    location.hash = `#/rooms/${encodeURIComponent(room.room_id)}`;
    reloadRooms();
  } catch (e) {
    $('create-error').textContent = e.message;
  }
}

async function search(ev, more = false) {
  if (ev) ev.preventDefault();
  if (!more) {
    state.searchTags = tagsOf($('search-tags').value);
    state.searchCursor = null;
    $('search-results').replaceChildren();
  }
  if (state.searchTags.length === 0) return;
  const q = new URLSearchParams();
  for (const t of state.searchTags) q.append('tag', t);
  q.set('limit', '20');
  if (more && state.searchCursor) q.set('after', state.searchCursor);
  $('search-status').textContent = 'Searching…';
  try {
    const r = await api('GET', `/v1/rooms/search?${q}`);
    $('search-results').append(...r.rooms.map((room) => roomItem(room, { join: true })));
    state.searchCursor = r.next_cursor || null;
    const n = $('search-results').children.length;
    $('search-status').textContent = `${n} room${n === 1 ? '' : 's'} with ${state.searchTags.map((t) => `#${t}`).join(' ')}`;
  } catch (e) {
    $('search-status').textContent = e.message;
  }
  $('search-more').hidden = !state.searchCursor;
}

async function joinRoom(id, button) {
  button.disabled = true;
  try {
    const room = await api('POST', `/v1/rooms/${encodeURIComponent(id)}/members`);
    room._activity = Date.now();
    state.rooms.set(room.room_id, withLatest(room));
    renderRooms();
    location.hash = `#/rooms/${encodeURIComponent(room.room_id)}`;
    reloadRooms(); // the server's unread count and last message
  } catch (e) {
    button.disabled = false;
    $('search-status').textContent = e.message;
  }
}

// ---------------------------------------------------------------------------------------------
// One room

async function openRoom(id, { keepScroll = false } = {}) {
  const fresh = !state.room || state.room.id !== id;
  if (fresh) {
    state.room = { id, info: null, messages: new Map(), before: null, maxSeq: 0 };
    $('messages').replaceChildren();
    $('room-title').textContent = 'Room';
    $('room-meta').textContent = '';
    $('send-error').textContent = '';
  }
  const room = state.room;
  try {
    const [info, page] = await Promise.all([
      api('GET', `/v1/rooms/${encodeURIComponent(id)}`),
      api('GET', `/v1/rooms/${encodeURIComponent(id)}/messages?limit=50`),
    ]);
    if (state.room !== room) return;
    room.info = info;
    $('room-title').textContent = info.name || (info.kind === 'direct' ? `Chat about ${info.product_id}` : id);
    renderRoomMeta();
    for (const m of page.messages) addMessage(m);
    if (fresh) room.before = page.next_before;
    $('room-older').hidden = room.before == null;
    if (!keepScroll || fresh) scrollToBottom();
    markRoomRead();
  } catch (e) {
    $('room-meta').textContent = e.status === 404 || e.status === 403 ? 'No such room, or you are not in it.' : e.message;
  }
}

function renderRoomMeta() {
  const info = state.room && state.room.info;
  if (!info) return;
  const tags = (info.tags || []).map((t) => `#${t}`).join(' ');
  const members = info.member_ids ? info.member_ids.join(', ') : `${info.members}`;
  $('room-meta').textContent = `${tags}${tags ? ' · ' : ''}members: ${members}${info.closed ? ' · closed' : ''}`;
}

async function loadOlder() {
  const room = state.room;
  if (!room || room.before == null) return;
  const b = $('room-older');
  b.disabled = true;
  const scroller = $('scroller');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  try {
    const page = await api('GET', `/v1/rooms/${encodeURIComponent(room.id)}/messages?limit=50&before=${room.before}`);
    if (state.room !== room) return;
    for (const m of page.messages) addMessage(m);
    room.before = page.next_before;
    // Keep what the reader was looking at where it was.
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
  } finally {
    b.disabled = false;
    b.hidden = room.before == null;
  }
}

/** Adds a message to the open room once (by message_id), in seq order. Returns whether it was new. */
function addMessage(m) {
  const room = state.room;
  if (!room || !m.message_id) return false;
  const known = room.messages.get(m.message_id);
  if (known) {
    // Same message again (history page and stream): only an edit or a delete changes it.
    if (m.edited || m.deleted) updateMessage(Object.assign(known, m));
    return false;
  }
  room.messages.set(m.message_id, m);
  room.maxSeq = Math.max(room.maxSeq, m.seq || 0);
  const li = el('li', { 'data-message-id': m.message_id, 'data-seq': String(m.seq), class: m.sender_id === state.user ? 'mine' : '' });
  const list = $('messages');
  const after = [...list.children].find((c) => Number(c.dataset.seq) > m.seq);
  list.insertBefore(li, after || null);
  updateMessage(m, li);
  return true;
}

function updateMessage(m, li = $('messages').querySelector(`li[data-message-id="${CSS.escape(m.message_id)}"]`)) {
  if (!li) return;
  li.replaceChildren(
    el('span', { class: 'sender', text: m.sender_id }),
    el('span', { class: 'time', text: `${fmtTime(m.occurred_at)}${m.edited ? ' · edited' : ''}` }),
    el('div', { class: m.deleted ? 'text deleted' : 'text', text: m.deleted ? 'Message deleted' : m.text }),
  );
}

function scrollToBottom() {
  const s = $('scroller');
  s.scrollTop = s.scrollHeight;
}

const markRoomRead = debounce(async () => {
  const room = state.room;
  if (!room || !room.maxSeq || document.hidden || !location.hash.startsWith('#/rooms/')) return;
  try {
    const r = await api('POST', `/v1/rooms/${encodeURIComponent(room.id)}/read`, { seq: room.maxSeq });
    const mine = state.rooms.get(room.id);
    if (mine) {
      mine.unread = r.unread;
      renderRooms();
    }
  } catch {
    /* not a member any more, or offline: the count stays as it was */
  }
}, 200);

async function send(ev) {
  ev.preventDefault();
  const input = $('send-text');
  const text = input.value;
  const room = state.room;
  if (!room || !text.trim()) return;
  $('send-error').textContent = '';
  // Sending the same text again after a failure (a retry) reuses its client_id, which makes it
  // the same message on the server, never a second one.
  if (input.dataset.clientText !== text) Object.assign(input.dataset, { clientId: randomId(), clientText: text });
  const clientId = input.dataset.clientId;
  try {
    const m = await api('POST', `/v1/rooms/${encodeURIComponent(room.id)}/messages`, { text, client_id: clientId });
    delete input.dataset.clientText;
    if (input.value === text) input.value = ''; // not what was typed meanwhile
    if (state.room === room && addMessage(m)) scrollToBottom();
    noteActivity(room.id, m, true);
  } catch (e) {
    if (e.status !== undefined && e.status < 500 && e.status !== 429) delete input.dataset.clientText;
    const why = {
      403: 'You are not a member of this room.',
      413: 'That message is too long.',
      422: 'Write something first.',
      429: `Slow down: try again in ${e.retryAfter || 'a few'} seconds.`,
    }[e.status];
    $('send-error').textContent = why || e.message;
  }
}

// ---------------------------------------------------------------------------------------------
// Chat events from the stream

function onChatEvent(kind, data) {
  let ev = data.event;
  if (typeof ev === 'string') ev = safeJson(ev);
  if (!ev || !ev.room_id) return;
  // The payload of the event's type, whether or not the union arrives wrapped in its branch name.
  const p = (ev.payload && ev.payload[ev.event_type]) || ev.payload || {};
  const open = state.room && state.room.id === ev.room_id;
  switch (kind) {
    case 'chat.message': {
      const m = {
        message_id: p.message_id,
        seq: data.seq ?? p.seq,
        sender_id: p.sender_id,
        text: p.text,
        occurred_at: ev.occurred_at,
        edited: false,
        deleted: false,
      };
      if (open && addMessage(m)) {
        const s = $('scroller');
        if (s.scrollHeight - s.scrollTop - s.clientHeight < 120 || m.sender_id === state.user) scrollToBottom();
        if (m.sender_id !== state.user) announce(`${m.sender_id}: ${m.text}`);
        markRoomRead();
      }
      noteActivity(ev.room_id, m, open);
      break;
    }
    case 'chat.message_edited':
    case 'chat.message_deleted': {
      const known = open && state.room.messages.get(p.message_id);
      if (known) {
        if (kind === 'chat.message_edited') Object.assign(known, { text: p.text, edited: true });
        else known.deleted = true;
        updateMessage(known);
      }
      reloadRooms();
      break;
    }
    case 'chat.member_joined':
    case 'chat.member_left':
      if (open) {
        api('GET', `/v1/rooms/${encodeURIComponent(ev.room_id)}`)
          .then((info) => {
            if (state.room && state.room.id === ev.room_id) {
              state.room.info = info;
              renderRoomMeta();
            }
          })
          .catch(() => {});
      }
      reloadRooms();
      break;
    default: // chat.read (another tab of ours), chat.room_created, chat.room_closed
      reloadRooms();
  }
}

/** A message in a room of ours: move it up, and count it unread unless it is ours or being read. */
function noteActivity(roomId, m, reading) {
  const room = state.rooms.get(roomId);
  if (!room) {
    reloadRooms(); // a room we were just added to
    return;
  }
  // Only messages after what the server's count covered are new to it (a resume can replay).
  if (!(m.seq > room.latestSeq)) return;
  room.latestSeq = m.seq;
  room.last_message = m;
  room._activity = Date.now();
  if (!reading && m.sender_id !== state.user) room.unread = (room.unread || 0) + 1;
  renderRooms();
}

// ---------------------------------------------------------------------------------------------
// Coupon drop
//
// The coupons whose claim window has not closed, with their stock left (GET /v1/coupons: read
// from the store, up to a second old, and it says when), refreshed every COUPON_POLL_MS while
// their view is open and the page visible. A claim is POST …/claims with an Idempotency-Key; the
// answer is 201 issued (with the code), 409 with the reason, or 202 pending, which the stream
// (coupon.issued, coupon.claim_rejected) or GET …/claims/me, asked with growing pauses, settles.
// When a claim's answer never came (network error, 5xx, 429), its key is kept and the next press
// sends it again: the server takes that as the same claim, never as a second one.

const COUPON_POLL_MS = 1500;
/** Kinds the topology delivers but never keeps in the inbox (`inbox: false`): read out only. */
const DELIVERY_ONLY = new Set(['coupon.claim_rejected', 'coupon.redemption_refused']);
/** Why a claim was not issued, in plain words, by the reason the server gives. */
const REASONS = {
  sold_out: 'Sold out: every coupon was taken before your claim.',
  already_claimed: 'You already hold this coupon (see your inbox).',
  not_open: 'Not open yet: claiming has not started.',
  closed: 'Closed: claiming has ended.',
  unknown_coupon: 'Unknown: there is no such coupon.',
};
/** Pauses before each ask of …/claims/me about a pending claim (the stream usually comes first). */
const PENDING_PAUSES_MS = [300, 600, 1000, 1500, 2000, 3000, 5000, 5000, 10000, 10000];

let couponTimer = null;
let couponLoading = false;
let couponAgain = false;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const settled = (claim) => claim.status === 'issued' || claim.status === 'rejected';

function fmtClock(v) {
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

/** The list, and whether this gateway has the coupon API at all (its tab shows only then). */
async function loadCoupons() {
  let r;
  try {
    r = await api('GET', '/v1/coupons');
  } catch (e) {
    if (e.status === 404) {
      state.couponsApi = false;
      $('tab-coupons').hidden = true;
      return;
    }
    throw e;
  }
  state.couponsApi = true;
  $('tab-coupons').hidden = false;
  renderCoupons(r.coupons || [], r.as_of);
}

/** At sign-in: a failure other than "no such API" leaves the tab there, and its view retries. */
function probeCoupons() {
  return loadCoupons().catch(() => {});
}

function couponsShown() {
  return Boolean(state.token) && !$('view-coupons').hidden && !document.hidden;
}

/** Refreshes the list now and then every COUPON_POLL_MS while its view is open and the page
 * visible; anywhere else it stops. One request at a time: a call during one runs right after it. */
async function refreshCoupons() {
  clearTimeout(couponTimer);
  couponTimer = null;
  if (!couponsShown()) return;
  if (couponLoading) {
    couponAgain = true;
    return;
  }
  couponLoading = true;
  couponAgain = false;
  try {
    await loadCoupons();
  } catch (e) {
    $('coupons-fresh').textContent = `Could not refresh the coupons (${e.message}); trying again.`;
  } finally {
    couponLoading = false;
  }
  if (couponsShown() && !couponTimer) couponTimer = setTimeout(refreshCoupons, couponAgain ? 0 : COUPON_POLL_MS);
}

function renderCoupons(list, asOf) {
  const ul = $('coupon-list');
  const seen = new Set();
  let prev = null;
  for (const info of list) {
    seen.add(info.id);
    let c = state.coupons.get(info.id);
    if (!c) {
      c = { info, li: null, claim: { status: 'idle', key: null, retryKey: null } };
      c.li = couponItem(c);
      state.coupons.set(info.id, c);
      findHeld(c);
    }
    c.info = info;
    // The server's order (newest opening first). Items are updated in place and moved only when
    // out of place: a keyboard user's focus stays on the button they are on.
    const want = prev ? prev.nextSibling : ul.firstChild;
    if (c.li !== want) ul.insertBefore(c.li, want);
    prev = c.li;
    renderCoupon(c);
  }
  for (const [id, c] of state.coupons) {
    // Gone from the list (its window closed); kept while a claim on it is still being answered.
    if (!seen.has(id) && (settled(c.claim) || c.claim.status === 'idle')) {
      c.li.remove();
      state.coupons.delete(id);
    }
  }
  $('coupons-empty').hidden = state.coupons.size > 0;
  if (asOf) $('coupons-fresh').textContent = `Stock left as of ${fmtClock(asOf)}; it refreshes by itself.`;
}

function couponItem(c) {
  const button = el('button', { type: 'button', class: 'claim' });
  button.addEventListener('click', () => claimCoupon(c));
  return el(
    'li',
    { 'data-coupon-id': c.info.id },
    el('span', { class: 'row' }, el('span', { class: 'title' }), el('span', { class: 'tag discount' })),
    el('span', { class: 'meta window' }),
    el('span', { class: 'stock' }),
    el('span', { class: 'row' }, button),
    el('p', { class: 'outcome' }),
  );
}

/** The claim button's label and whether it can be pressed now. */
function buttonState(c) {
  const { info, claim } = c;
  if (claim.status === 'claiming' || claim.status === 'pending') return ['Claiming…', false];
  if (claim.status === 'issued' || (claim.status === 'rejected' && claim.reason === 'already_claimed')) return ['Claimed', false];
  if (info.status === 'closed' || (claim.status === 'rejected' && claim.reason === 'closed')) return ['Closed', false];
  if (info.status === 'upcoming') return ['Not open yet', false];
  if (info.status === 'sold_out' || info.stock_left <= 0 || (claim.status === 'rejected' && claim.reason === 'sold_out')) {
    return ['Sold out', false];
  }
  if (claim.status === 'failed' && claim.retryKey) return ['Try again', true];
  return ['Claim', true];
}

function windowText(info) {
  switch (info.status) {
    case 'upcoming':
      return `Opens at ${fmtTime(info.claim_opens_at)}`;
    case 'sold_out':
      return 'Sold out';
    case 'closed':
      return 'Closed';
    default:
      return `Open until ${fmtTime(info.claim_closes_at)}`;
  }
}

/** The outcome of the user's claim, as nodes (the code in its own element) and as one text. */
function outcomeOf(claim) {
  switch (claim.status) {
    case 'claiming':
      return ['Claiming…'];
    case 'pending':
      return ['Your claim is in; waiting for the decision…'];
    case 'issued':
      return [
        'Yours! Code ',
        el('strong', { class: 'code', text: claim.code }),
        claim.expires_at ? `, valid until ${fmtTime(claim.expires_at)}.` : '.',
        ' It is in your inbox.',
      ];
    case 'rejected':
      return [REASONS[claim.reason] || `Not claimed (${claim.reason}).`];
    case 'failed':
      return [claim.message];
    default:
      return [];
  }
}

function renderCoupon(c) {
  const { info, li, claim } = c;
  const q = (s) => li.querySelector(s);
  li.dataset.status = info.status;
  q('.title').textContent = info.title;
  q('.discount').textContent = `${info.discount_percent}% off`;
  q('.window').textContent = windowText(info);
  const stock = q('.stock');
  stock.dataset.left = String(info.stock_left);
  stock.textContent = `${info.stock_left} of ${info.stock} left`;
  const [label, enabled] = buttonState(c);
  const b = q('button.claim');
  b.textContent = label;
  b.setAttribute('aria-label', `${label}: ${info.title}`);
  // aria-disabled rather than disabled: a focused button keeps the focus while its claim runs.
  b.setAttribute('aria-disabled', String(!enabled));
  const o = q('.outcome');
  o.dataset.outcome = claim.status === 'rejected' ? claim.reason : claim.status;
  o.replaceChildren(...outcomeOf(claim));
}

/** Reads the outcome out (once per change; the list's refreshes are not announced). */
function sayOutcome(c) {
  const text = outcomeOf(c.claim).map((n) => (typeof n === 'string' ? n : n.textContent)).join('');
  $('coupon-live').textContent = `${c.info.title}: ${text}`;
}

async function claimCoupon(c) {
  if (!buttonState(c)[1]) return; // aria-disabled: pressing it does nothing
  const key = c.claim.retryKey || randomId();
  const claim = { status: 'claiming', key, retryKey: key };
  c.claim = claim;
  renderCoupon(c);
  sayOutcome(c);
  let r;
  try {
    r = await api('POST', `/v1/coupons/${encodeURIComponent(c.info.id)}/claims`, {}, { headers: { 'Idempotency-Key': key } });
  } catch (e) {
    if (c.claim !== claim || settled(claim)) return; // the stream was first
    if ((e.status === 409 || e.status === 404) && e.code in REASONS) {
      settleClaim(c, key, { status: 'rejected', reason: e.code });
    } else if (e.status === undefined || e.status >= 500 || e.status === 429) {
      // The claim may have been taken: the next press sends the same key, so it stays one claim.
      failClaim(c, claim, `No decision came back (${e.message}). Press Try again: it stays the same claim.`, true);
    } else {
      failClaim(c, claim, `Not claimed: ${e.message}`, false);
    }
    return;
  }
  if (c.claim !== claim || settled(claim)) return;
  if (r.status === 'issued') {
    settleClaim(c, key, { status: 'issued', code: r.code, expires_at: r.expires_at });
  } else {
    claim.status = 'pending';
    renderCoupon(c);
    sayOutcome(c);
    awaitDecision(c, claim);
  }
}

function failClaim(c, claim, message, retry) {
  Object.assign(claim, { status: 'failed', message, retryKey: retry ? claim.key : null });
  renderCoupon(c);
  sayOutcome(c);
}

/** The decision of claim `key` (from the POST's answer, the stream or …/claims/me), once. */
function settleClaim(c, key, outcome) {
  if (c.claim.key !== key || settled(c.claim)) return;
  Object.assign(c.claim, outcome, { retryKey: null });
  renderCoupon(c);
  sayOutcome(c);
  refreshCoupons(); // the stock moved
}

/** GET …/claims/me: the decision of claim `key`, or without one the coupon the user holds (else
 * their most final rejection); null when there is none yet. */
async function decidedClaim(id, key) {
  const headers = key ? { 'Idempotency-Key': key } : {};
  try {
    return await api('GET', `/v1/coupons/${encodeURIComponent(id)}/claims/me`, undefined, { headers });
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

/** Asks the server about `claim` once; settles it when decided. */
async function askDecision(c, claim) {
  let d;
  try {
    d = await decidedClaim(c.info.id, claim.key);
  } catch {
    return;
  }
  // Another claim's decision (an earlier one of ours) is not this one's.
  if (!d || (d.claim_id && d.claim_id !== claim.key)) return;
  if (d.status === 'issued') settleClaim(c, claim.key, { status: 'issued', code: d.code, expires_at: d.expires_at });
  else if (d.status === 'rejected') settleClaim(c, claim.key, { status: 'rejected', reason: d.reason });
}

/** A 202: asks …/claims/me with growing pauses until the claim is settled (often by the stream). */
async function awaitDecision(c, claim) {
  for (const ms of PENDING_PAUSES_MS) {
    await sleep(ms);
    if (c.claim !== claim || claim.status !== 'pending') return;
    await askDecision(c, claim);
  }
  if (c.claim === claim && claim.status === 'pending') {
    failClaim(c, claim, 'No decision yet. Press Try again to ask once more: it stays the same claim.', true);
  }
}

/** A coupon seen for the first time (a reload, another tab's claim): show it as ours if we hold it. */
async function findHeld(c) {
  let d;
  try {
    d = await decidedClaim(c.info.id);
  } catch {
    return;
  }
  if (d && d.status === 'issued' && c.claim.status === 'idle') {
    c.claim = { status: 'issued', key: null, retryKey: null, code: d.code, expires_at: d.expires_at };
    renderCoupon(c);
  }
}

/** coupon.* from the stream: settles a claim of ours on that coupon, and the stock moved. Whether
 * it was the rejection of the claim the drop shows. */
function onCouponEvent(kind, n) {
  let ev = n.event;
  if (typeof ev === 'string') ev = safeJson(ev);
  const link = /^\/coupons\/([^/?#]+)/.exec(n.link || '');
  const id = (ev && ev.coupon_id) || (link && decodeURIComponent(link[1]));
  const c = id && state.coupons.get(id);
  let shown = false;
  if (c && kind === 'coupon.claim_rejected' && ev) {
    // The payload of the event's type, whether or not the union arrives wrapped in its branch name.
    const p = (ev.payload && ev.payload[ev.event_type]) || ev.payload || {};
    if (p.claim_id && p.reason) settleClaim(c, p.claim_id, { status: 'rejected', reason: p.reason });
    shown = Boolean(p.claim_id) && p.claim_id === c.claim.key;
  } else if (c && kind === 'coupon.issued' && !settled(c.claim)) {
    // This notification names no claim: the server says which (and the code).
    if (c.claim.key) askDecision(c, c.claim);
    else findHeld(c);
  }
  if (id) refreshCoupons();
  return shown;
}

// ---------------------------------------------------------------------------------------------
// Preferences: the categories a user gets (critical ones always on), time zone, quiet hours and
// the language campaigns are shown in (when the gateway answers with a `locale`)

async function loadPreferences() {
  $('prefs-error').textContent = '';
  renderPreferences(await api('GET', '/v1/me/preferences'));
}

function renderPreferences(p) {
  const box = $('prefs-categories');
  box.replaceChildren(el('legend', { text: 'Notify me about' }));
  for (const c of p.categories) {
    const id = `prefs-cat-${c.name}`;
    const input = el('input', {
      type: 'checkbox', id, name: 'category', value: c.name,
      checked: c.critical || !p.opt_out.includes(c.name), disabled: c.critical,
    });
    const note = c.critical ? ' (always on)' : '';
    const text = c.description ? `${c.name}: ${c.description}${note}` : `${c.name}${note}`;
    box.append(el('div', { class: 'check' }, input, el('label', { htmlFor: id, text })));
  }
  $('prefs-tz').value = p.time_zone;
  // A gateway without locales answers none, and would refuse the field in a save.
  state.prefsLocale = 'locale' in p;
  $('prefs-locale-field').hidden = !state.prefsLocale;
  $('prefs-locale').value = p.locale || '';
  $('prefs-quiet-on').checked = Boolean(p.quiet_hours);
  if (p.quiet_hours) {
    $('prefs-quiet-start').value = p.quiet_hours.start;
    $('prefs-quiet-end').value = p.quiet_hours.end;
  }
  syncQuietHours();
}

function syncQuietHours() {
  const on = $('prefs-quiet-on').checked;
  $('prefs-quiet-start').disabled = !on;
  $('prefs-quiet-end').disabled = !on;
}

async function savePreferences(e) {
  e.preventDefault();
  $('prefs-error').textContent = '';
  $('prefs-status').textContent = 'Saving…';
  const boxes = [...document.querySelectorAll('#prefs-categories input[name=category]')];
  const body = {
    opt_out: boxes.filter((i) => !i.disabled && !i.checked).map((i) => i.value),
    time_zone: $('prefs-tz').value.trim(),
    quiet_hours: $('prefs-quiet-on').checked
      ? { start: $('prefs-quiet-start').value, end: $('prefs-quiet-end').value }
      : null,
  };
  if (state.prefsLocale) body.locale = $('prefs-locale').value.trim() || null;
  try {
    renderPreferences(await api('PUT', '/v1/me/preferences', body));
    $('prefs-status').textContent = 'Preferences saved.';
  } catch (err) {
    $('prefs-status').textContent = '';
    $('prefs-error').textContent = `Not saved: ${err.message}`;
  }
}

function setUpPreferences() {
  $('prefs-form').addEventListener('submit', savePreferences);
  $('prefs-quiet-on').addEventListener('change', syncQuietHours);
  const zones = Intl.supportedValuesOf ? Intl.supportedValuesOf('timeZone') : [];
  $('prefs-tz-list').replaceChildren(...zones.map((z) => el('option', { value: z })));
}

// ---------------------------------------------------------------------------------------------
// Status (admins and services only: GET /v1/status answers a plain user 403, and its tab stays hidden)

const STATUS_POLL_MS = 5000;
let statusTimer = null;
let statusLoading = false;

/** At sign-in: whether this user may read the status (200) and so sees its tab. */
async function probeStatus() {
  try {
    const r = await fetch('/v1/status', { headers: { Authorization: `Bearer ${state.token}` } });
    state.admin = r.ok;
    if (r.ok) renderStatus(await r.json());
  } catch {
    state.admin = false;
  }
  $('tab-status').hidden = !state.admin;
}

function statusShown() {
  return Boolean(state.token) && state.admin && !$('view-status').hidden && !document.hidden;
}

/** Refreshes the status now and then every STATUS_POLL_MS while its view is open and the page
 * visible; anywhere else it stops. One request at a time. */
async function refreshStatus() {
  clearTimeout(statusTimer);
  statusTimer = null;
  if (!statusShown() || statusLoading) return;
  statusLoading = true;
  try {
    renderStatus(await api('GET', '/v1/status'));
  } catch (e) {
    $('status-summary').textContent = `Could not refresh the status (${e.message}); trying again.`;
  } finally {
    statusLoading = false;
    if (statusShown()) statusTimer = setTimeout(refreshStatus, STATUS_POLL_MS);
  }
}

function statusTable(caption, head, rows) {
  const tr = (cells, tag) => el('tr', {}, ...cells.map((c) => el(tag, { text: c == null ? '-' : String(c) })));
  return el(
    'table',
    { class: 'status-table' },
    el('caption', { text: caption }),
    el('thead', {}, tr(head, 'th')),
    el('tbody', {}, ...rows.map((r) => tr(r, 'td'))),
  );
}

const secs = (s) => (s == null ? '-' : s.toFixed(1));

function renderStatus(r) {
  const bad = r.groups.filter((g) => g.state !== 'ok');
  const when = new Date(r.generated_at_ms).toLocaleTimeString();
  $('status-summary').textContent = r.ok
    ? `All groups OK (${when}).`
    : `${bad.length} group(s) not OK: ${bad.map((g) => `${g.stage} ${g.state}`).join(', ')} (${when}).`;
  $('status-summary').dataset.ok = r.ok ? '1' : '0';
  const groups = statusTable(
    'Groups',
    ['Stage', 'Group', 'State', 'Members', 'Instances', 'Lag', 'Lag seconds', 'Why'],
    r.groups.map((g) => [g.stage, g.group, g.state, g.members, g.instances.length, g.lag_messages, secs(g.lag_seconds), g.reason || '']),
  );
  const instances = statusTable(
    'Instances',
    ['Instance', 'Host', 'PID', 'Stages', 'Partitions', 'Gateway'],
    r.instances.map((a) => [
      a.instance,
      a.host,
      a.pid,
      a.stages.join(', '),
      Object.values(a.groups).reduce((n, o) => n + o.partitions.length, 0),
      a.gateway ? a.gateway.url : '',
    ]),
  );
  const partitions = statusTable(
    'Partitions and owners',
    ['Group', 'Partition', 'Owner', 'Lag', 'Lag seconds', 'State'],
    r.groups.flatMap((g) =>
      g.partitions.map((p) => [g.group, `${p.topic}[${p.partition}]`, p.owners.join(', ') || '(none)', p.lag_messages, secs(p.lag_seconds), p.state]),
    ),
  );
  const letters = statusTable(
    'Dead letters',
    ['Topic', 'Reason', 'Letters'],
    r.dead_letters.flatMap((d) => [[d.topic, '(all)', d.total], ...Object.entries(d.by_reason).map(([k, n]) => [d.topic, k, n])]),
  );
  const gateways = statusTable(
    'Gateways',
    ['Instance', 'URL', 'Streams', 'Partitions'],
    r.gateways.map((g) => [g.instance, g.url, g.streams, g.partitions]),
  );
  $('status-body').replaceChildren(groups, gateways, letters, instances, partitions);
}

// ---------------------------------------------------------------------------------------------
// Views (the hash is the view, so a reload comes back to it)

function route() {
  if (!state.token) return;
  const h = location.hash || '#/inbox';
  const m = h.match(/^#\/rooms\/(.+)$/);
  let view = 'inbox';
  if (m && state.chat) view = 'room';
  else if (h === '#/rooms' && state.chat) view = 'rooms';
  else if (h === '#/find' && state.chat) view = 'find';
  else if (h === '#/coupons' && state.couponsApi) view = 'coupons';
  else if (h === '#/archived') view = 'archived';
  else if (h === '#/preferences') view = 'preferences';
  else if (h === '#/status' && state.admin) view = 'status';
  for (const v of ['inbox', 'coupons', 'rooms', 'find', 'room', 'archived', 'preferences', 'status']) $(`view-${v}`).hidden = v !== view;
  const tabs = [['tab-inbox', 'inbox'], ['tab-coupons', 'coupons'], ['tab-rooms', 'rooms'], ['tab-find', 'find'], ['tab-preferences', 'preferences'], ['tab-status', 'status']];
  for (const [tab, v] of tabs) {
    const current = v === view || (v === 'rooms' && view === 'room') || (v === 'inbox' && view === 'archived');
    if (current) $(tab).setAttribute('aria-current', 'page');
    else $(tab).removeAttribute('aria-current');
  }
  if (view === 'room') openRoom(decodeURIComponent(m[1]));
  else state.room = null;
  if (view === 'archived') loadArchived().catch(() => {});
  if (view === 'preferences') loadPreferences().catch(() => {});
  refreshCoupons(); // starts the coupon list's refreshes in its view, stops them elsewhere
  refreshStatus(); // likewise for the status
  // Move focus to the view's heading, so keyboard and screen reader users land in it.
  const headings = { inbox: 'inbox-h', coupons: 'coupons-h', rooms: 'rooms-h', find: 'find-h', room: 'room-title' };
  const heading = { ...headings, archived: 'archived-h', preferences: 'prefs-h', status: 'status-h' }[view];
  if (document.activeElement === document.body || document.activeElement?.closest('nav')) $(heading).focus();
}

// ---------------------------------------------------------------------------------------------
// Start

async function start() {
  const config = await fetch('/config.json').then((r) => r.json());
  state.kinds = config.kinds || [];
  $('dev-form').hidden = !config.dev_sign_in;

  $('dev-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const r = await fetch('/v1/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ user_id: $('dev-user').value.trim() }),
      });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? body.error.message : `${r.status}`);
      await signIn(body.token);
    } catch (err) {
      $('signin-error').textContent = err.message;
    }
  });
  $('token-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await signIn($('token-input').value.trim());
      $('token-input').value = '';
    } catch (err) {
      $('signin-error').textContent = err.message;
    }
  });
  $('sign-out').addEventListener('click', () => signOut());
  $('inbox-more').addEventListener('click', () => loadMoreInbox().catch(() => {}));
  setUpInboxTools();
  setUpPreferences();
  $('create-form').addEventListener('submit', createRoom);
  $('search-form').addEventListener('submit', (e) => search(e));
  $('search-more').addEventListener('click', () => search(null, true));
  $('room-older').addEventListener('click', () => loadOlder().catch(() => {}));
  $('scroller').addEventListener('scroll', () => {
    if ($('scroller').scrollTop < 30 && !$('room-older').hidden && !$('room-older').disabled) loadOlder().catch(() => {});
  });
  $('send-form').addEventListener('submit', send);
  window.addEventListener('hashchange', route);
  document.addEventListener('visibilitychange', () => {
    markRoomRead();
    refreshCoupons();
    refreshStatus();
  });

  const saved = sessionStorage.getItem(TOKEN);
  if (saved) {
    try {
      await signIn(saved);
    } catch (err) {
      signOut(err.message);
    }
  } else {
    show(false);
  }
  document.body.dataset.ready = '1';
}

start().catch((e) => {
  $('signin-error').textContent = `The page could not start: ${e.message}`;
});
