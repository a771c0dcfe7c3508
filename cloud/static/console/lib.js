// What every console page shares: the API (cookie session + CSRF token), strings in Chinese and English, safe DOM
// building (text is always text: nothing user-controlled goes through innerHTML), formats in the operator's time
// zone, sortable tables, CSV links, charts (uPlot), dialogs and toasts.
import uPlot from './vendor/uplot/uPlot.esm.js';

export const state = { me: null, csrf: '', lang: 'zh', tz: 'Asia/Shanghai', onSignedOut: null };

// ------------------------------------------------------------------ strings
const STRINGS = { zh: {}, en: {} };
export function addStrings(more) {
  for (const lang of ['zh', 'en']) Object.assign(STRINGS[lang], more[lang] || {});
}
/** The string for ``key`` in the current language (Chinese if English lacks it); ``{name}`` filled from vars. */
export function t(key, vars = {}) {
  const s = STRINGS[state.lang][key] ?? STRINGS.zh[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (vars[k] ?? `{${k}}`));
}

// ------------------------------------------------------------------ the API
export class ApiError extends Error {
  /** ``message``: in the operator's language (:func:`refusalText`); ``serverMessage``: the server's own words. */
  constructor(status, code, message, body, serverMessage = message) {
    super(message); this.status = status; this.code = code; this.body = body; this.serverMessage = serverMessage;
  }
}
// in Chinese, the server's (English) words follow these as the detail: they name the field, the limit, the state
const DETAILED = new Set(['invalid_request', 'weak_password', 'bad_date', 'period_too_long', 'forbidden', 'rollout_state',
  'bad_refund', 'below_zero', 'machine_in_rollout', 'no_machines', 'bad_amount', 'bad_cursor', 'not_settled']);
const BY_STATUS = { 400: 'err.s400', 401: 'err.s401', 403: 'err.s403', 404: 'err.s404', 405: 'err.s400', 409: 'err.s409',
  410: 'err.s410', 413: 'err.s413', 415: 'err.s415', 422: 'err.s400', 429: 'err.s429', 500: 'err.s500', 503: 'err.s503' };
/** What a refusal says in the operator's language: in Chinese the console's words for its code (with the server's
 *  words after them where they carry the detail), or for a code it does not know, a sentence by the HTTP status
 *  with the server's words after it; in English, the server's own words. */
export function refusalText(status, code, message) {
  if (state.lang !== 'zh') return message;
  const words = STRINGS.zh[`err.${code}`];
  if (words) return DETAILED.has(code) && message ? `${words}（${message}）` : words;
  return `${STRINGS.zh[BY_STATUS[status] || 'err.other']}${message ? `（${message}）` : ''}`;
}
const SIGNED_OUT = ['signed_out', 'operator_disabled', 'unauthenticated'];
/** JSON in and out; changes carry the CSRF token; a 401 means the session ended (the sign-in page shows). */
export async function api(method, path, body, retried = false) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = state.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                            credentials: 'same-origin' });
  } catch (e) {
    throw new ApiError(0, 'network', t('err.network'));
  }
  const data = r.headers.get('content-type')?.includes('json') ? await r.json() : {};
  if (!r.ok) {
    if (r.status === 403 && data.error === 'csrf' && !retried) {      // signed in again in another tab: a new token
      const me = await api('GET', '/api/v1/console/me');
      state.csrf = me.csrf_token;
      return api(method, path, body, true);
    }
    // the session is over (not: a wrong password typed again to change something)
    if (r.status === 401 && SIGNED_OUT.includes(data.error) && state.onSignedOut) state.onSignedOut(data);
    const code = data.error || String(r.status), said = data.message || r.statusText;
    throw new ApiError(r.status, code, refusalText(r.status, code, said), data, said);
  }
  return data;
}
/** A query string from an object, leaving out empty values. */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) u.set(k, v);
  const s = u.toString();
  return s ? `?${s}` : '';
}

// ------------------------------------------------------------------ roles
const RANK = { viewer: 0, operator: 1, reviewer: 2, admin: 3 };
/** Whether the signed-in operator has at least ``role`` (or, with ``only``, one of those exactly). The server
 *  checks every request again: this only decides what is shown. */
export function can(role, only) {
  const mine = state.me?.role;
  if (!mine) return false;
  if (only) return only.includes(mine);
  return RANK[mine] >= RANK[role];
}

// ------------------------------------------------------------------ DOM
/** ``h('td', {class: 'num'}, text, child...)``: strings become text nodes; ``on*`` attributes become listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}
function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}
/** A page's own stylesheet (``pages/<name>.css``), linked once. */
export function css(name) {
  const href = `/static/console/pages/${name}.css`;
  if (!document.querySelector(`link[href="${href}"]`)) document.head.append(h('link', { rel: 'stylesheet', href }));
}
export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }
/** An SVG the server made itself (QR codes), never user input. */
export function trustedSvg(markup) {
  const doc = new DOMParser().parseFromString(markup, 'text/html');     // HTML parsing puts <svg> in its namespace
  return document.importNode(doc.body.querySelector('svg'), true);
}

// ------------------------------------------------------------------ formats
export function fen(n) {
  if (n === null || n === undefined) return '–';
  const sign = n < 0 ? '-' : '';
  return `${sign}¥${(Math.abs(n) / 100).toFixed(2)}`;
}
export function litres(ml) { return ml === null || ml === undefined ? '–' : `${(ml / 1000).toFixed(2)} L`; }
const fmtCache = {};
function fmt(kind) {
  const key = `${state.lang}/${state.tz}/${kind}`;
  if (!fmtCache[key]) {
    const base = { timeZone: state.tz, hourCycle: 'h23' };
    const opts = kind === 'date' ? { year: 'numeric', month: '2-digit', day: '2-digit' }
      : kind === 'time' ? { hour: '2-digit', minute: '2-digit', second: '2-digit' }
        : { year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' };
    fmtCache[key] = new Intl.DateTimeFormat('sv-SE', { ...base, ...opts });   // 2026-12-06 10:20:30 in either language
  }
  return fmtCache[key];
}
export function when(ms) { return ms ? fmt('full').format(new Date(ms)) : '–'; }
export function day(ms) { return ms ? fmt('date').format(new Date(ms)) : '–'; }
export function clock(ms) { return ms ? fmt('time').format(new Date(ms)) : '–'; }
/** "5 分钟前" / "5 min ago". */
export function ago(ms, now = Date.now()) {
  if (!ms) return t('time.never');
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return t('time.seconds', { n: s });
  if (s < 3600) return t('time.minutes', { n: Math.round(s / 60) });
  if (s < 86400) return t('time.hours', { n: Math.round(s / 3600) });
  return t('time.days', { n: Math.round(s / 86400) });
}
/** Milliseconds of the start of a yyyy-mm-dd day in the operator's time zone (China: UTC+8, no DST). */
export function dayStartMs(isoDay) {
  return isoDay ? Date.parse(`${isoDay}T00:00:00+08:00`) : '';
}
export function isoDay(ms) { return day(ms); }

// ------------------------------------------------------------------ tables
/** A table; columns ``{key, label, num, sort: false, render(row) -> node|string, title}``. Clicking a header
 *  sorts (numbers as numbers), or with ``onSort(key, dir)`` asks the server to (the rows are one page of many);
 *  ``select`` adds tick boxes and returns the set of ticked keys in ``.selected``; ``foot`` is a row (totals)
 *  drawn under the body with the same columns, never sorted. */
export function table({ columns, rows, rowKey, empty, select, onRow, onSort, sortKey = '', sortDir = 1, foot }) {
  const wrap = h('div', { class: 'tablewrap' });
  const selected = new Set();
  let key = sortKey; let dir = sortDir;
  const draw = () => {
    const sorted = key && !onSort ? [...rows].sort((a, b) => cmp(a[key], b[key]) * dir) : rows;
    const head = h('tr', {}, select ? h('th', {}, h('input', {
      type: 'checkbox', 'aria-label': t('table.all'),
      onchange: (e) => { for (const r of rows) e.target.checked ? selected.add(r[rowKey]) : selected.delete(r[rowKey]); draw(); },
    })) : null, columns.map((c) => h('th', { class: c.num ? 'num' : '', 'aria-sort': key === c.key ? (dir > 0 ? 'ascending' : 'descending') : null },
      c.sort === false ? c.label : h('button', { type: 'button', class: 'sort', onclick: () => { dir = key === c.key ? -dir : 1; key = c.key; onSort ? onSort(key, dir) : draw(); } },
        c.label, key === c.key ? (dir > 0 ? ' ▲' : ' ▼') : ''))));
    const body = sorted.map((r) => h('tr', { class: selected.has(r[rowKey]) ? 'selected' : '', dataset: { key: r[rowKey] ?? '' } },
      select ? h('td', {}, h('input', { type: 'checkbox', checked: selected.has(r[rowKey]), 'aria-label': String(r[rowKey]),
        onchange: (e) => { e.target.checked ? selected.add(r[rowKey]) : selected.delete(r[rowKey]); e.target.closest('tr').className = e.target.checked ? 'selected' : ''; wrap.onselect?.(selected); } })) : null,
      columns.map((c) => {
        const v = c.render ? c.render(r) : r[c.key];
        return h('td', { class: c.num ? 'num' : (c.wrap ? 'wrap' : '') }, v ?? '–');
      })));
    for (const tr of body) if (onRow) tr.addEventListener('dblclick', () => onRow(sorted[body.indexOf(tr)]));
    const total = foot ? h('tfoot', {}, h('tr', {}, select ? h('td') : null, columns.map((c) => h('td', { class: c.num ? 'num' : '' },
      (c.render ? c.render(foot) : foot[c.key]) ?? '')))) : null;
    clear(wrap, h('table', {}, h('thead', {}, head), h('tbody', {}, body), total),
      rows.length ? null : h('div', { class: 'empty' }, empty || t('table.empty')));
    wrap.onselect?.(selected);
  };
  draw();
  wrap.selected = selected;
  wrap.redraw = (newRows) => { rows = newRows; draw(); };
  return wrap;
}
function cmp(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1;
  if (b === null || b === undefined) return -1;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  if (typeof a === 'boolean') return a === b ? 0 : a ? -1 : 1;
  return String(a).localeCompare(String(b), state.lang === 'zh' ? 'zh-CN' : 'en');
}
/** A link that downloads a CSV the server makes from the same search (cookie session: a plain GET). */
export function csvLink(path, params) {
  return h('a', { class: 'button secondary', href: path + qs({ ...params, format: 'csv' }), download: '' }, t('csv'));
}

// ------------------------------------------------------------------ charts
/** A line or bar chart of time series: ``xs`` in ms, ``series`` [{label, values, color, unit}]. Resizes with its box.
 *  Bars stand on zero. ``days``: one value per day (``xs`` the days' starts): ticks and the legend name days, and
 *  the first and last bars are whole. */
export function chart(el, { xs, series, height = 240, bars = false, days = false }) {
  el.classList.add('chart');
  const width = Math.max(320, el.clientWidth || 600);
  const opts = {
    width, height,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), state.tz),
    scales: { x: { time: true, range: days ? (u, lo, hi) => [lo - 43200, hi + 43200] : undefined },
      ...(bars ? Object.fromEntries(series.map((s) => [s.unit, { range: (u, lo, hi) => uPlot.rangeNum(0, Math.max(hi, 1), 0.1, true) }])) : {}) },
    legend: { live: true },
    axes: [{ stroke: '#56626e', grid: { stroke: '#eef1f4' },
      ...(days ? { incrs: [86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400], values: (u, ts) => ts.map((x) => day(x * 1000).slice(5)) } : {}) },
      ...series.slice(0, 2).map((s, i) => ({ scale: s.unit, side: i ? 1 : 3, stroke: s.color, grid: { show: i === 0, stroke: '#eef1f4' },
        values: (u, vals) => vals.map((v) => `${v}${s.unit ? ` ${s.unit}` : ''}`), size: axisSize }))],
    series: [days ? { label: t('chart.day'), value: (u, x) => (x === null ? '–' : day(x * 1000)) } : { label: t('chart.time') }, ...series.map((s) => ({
      label: s.label, stroke: s.color, width: 2, scale: s.unit, spanGaps: false,
      fill: bars ? `${s.color}55` : undefined, points: bars ? { show: false } : undefined,
      paths: bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined,
      value: (u, v) => (v === null || v === undefined ? '–' : `${v}${s.unit ? ` ${s.unit}` : ''}`),
    }))],
  };
  const data = [xs.map((x) => x / 1000), ...series.map((s) => s.values)];
  el.replaceChildren();
  const plot = new uPlot(opts, data, el);
  const ro = new ResizeObserver(() => plot.setSize({ width: Math.max(320, el.clientWidth), height }));
  ro.observe(el);
  return plot;
}

const ruler = document.createElement('canvas').getContext('2d');
/** A y axis wide enough for its longest label (at least 70 px): "6200 ml/min" is not cut off. */
function axisSize(u, values) {
  ruler.font = '12px system-ui, sans-serif';
  const widest = Math.max(0, ...(values || []).map((v) => ruler.measureText(String(v)).width));
  return Math.max(70, Math.ceil(widest) + 18);
}

// ------------------------------------------------------------------ dialogs and toasts
/** A modal form; resolves with the values, or ``null`` if cancelled. ``fields`` [{name, label, type, required,
 *  value, options: [[value, label]], max, min, maxlength}]; ``submit(values)`` may throw ApiError to show it. */
export function dialog({ title, text, fields = [], ok = t('ok'), danger = false, submit }) {
  return new Promise((resolve) => {
    const err = h('div', { class: 'field-error', role: 'alert' });
    const inputs = {};
    const form = h('form', { method: 'dialog', novalidate: true }, h('h2', {}, title), text ? h('p', {}, text) : null,
      fields.map((f) => {
        const input = f.type === 'select'
          ? h('select', { name: f.name, required: f.required }, f.options.map(([v, l]) => h('option', { value: v, selected: String(v) === String(f.value) }, l)))
          : f.type === 'textarea'
            ? h('textarea', { name: f.name, required: f.required, maxlength: f.maxlength || 500 }, f.value ?? '')
            : h('input', { name: f.name, type: f.type || 'text', required: f.required, value: f.value ?? '',
              min: f.min, max: f.max, step: f.step, maxlength: f.maxlength, autocomplete: f.autocomplete || 'off', inputmode: f.inputmode });
        inputs[f.name] = input;
        return f.type === 'checkbox' ? h('label', { class: 'inline' }, input, f.label) : h('label', {}, f.label, input);
      }), err,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: danger ? 'danger' : '', value: 'ok' }, ok),
        h('button', { type: 'button', class: 'secondary', onclick: () => { dlg.close(); resolve(null); } }, t('cancel'))));
    const dlg = h('dialog', { 'aria-label': title }, form);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const values = {};
      for (const f of fields) {
        const el = inputs[f.name];
        values[f.name] = f.type === 'checkbox' ? el.checked : f.type === 'number' ? (el.value === '' ? null : Number(el.value)) : el.value.trim();
        if (f.required && (values[f.name] === '' || values[f.name] === null)) { err.textContent = t('err.required', { field: f.label }); el.focus(); return; }
      }
      try {
        const result = submit ? await submit(values) : values;
        dlg.close(); dlg.remove(); resolve(result ?? values);
      } catch (x) {
        err.textContent = x.message || String(x);
      }
    });
    dlg.addEventListener('cancel', () => resolve(null));
    document.body.append(dlg);
    dlg.showModal();
  });
}
let toastTimer;
export function toast(message, bad = false) {
  const el = document.getElementById('toast');
  el.textContent = message;
  el.className = bad ? 'toast bad' : 'toast';
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 4000);
}
/** Run an action, telling the operator what came of it. */
export async function act(fn, done) {
  try {
    const r = await fn();
    if (done) toast(done);
    return r;
  } catch (e) {
    toast(e.message || String(e), true);
    return undefined;
  }
}
/** A page's heading, with actions at its right. */
export function heading(title, ...actions) {
  return h('div', { class: 'pagehead' }, h('h1', {}, title), ...actions);
}

addStrings({
  zh: {
    ok: '确定', cancel: '取消', csv: '导出 CSV', 'chart.time': '时间', 'chart.day': '日期', 'table.empty': '没有记录', 'table.all': '全选', loading: '加载中…',
    'err.network': '网络错误，请检查连接后重试', 'err.required': '请填写：{field}',
    'err.s400': '请求有误', 'err.s401': '登录已失效，请重新登录', 'err.s403': '没有权限进行此操作', 'err.s404': '找不到要操作的对象',
    'err.s409': '与当前状态冲突，请刷新后再试', 'err.s410': '已失效', 'err.s413': '内容太大', 'err.s415': '文件类型不对',
    'err.s429': '操作太频繁，请稍后再试', 'err.s500': '服务器内部错误，已记录，请重试', 'err.s503': '服务暂时不可用，请稍后再试', 'err.other': '操作未完成',
    'err.signed_out': '请先登录控制台', 'err.unauthenticated': '登录已失效，请重新登录', 'err.token_expired': '此操作员令牌已过期，请管理员重新签发',
    'err.csrf': '页面已过期，请刷新后再试', 'err.forbidden': '您的角色不能进行此操作', 'err.operator_disabled': '此操作员已被管理员停用',
    'err.bad_credentials': '密码错误', 'err.too_many_logins': '此网络登录尝试过多，请稍后再试',
    'err.account_locked': '登录失败次数过多，账号已暂时锁定', 'err.totp_required': '请输入验证器应用中的 6 位动态码',
    'err.bad_totp': '动态码错误或已使用过', 'err.totp_enabled': '双重验证已开启，请先关闭', 'err.totp_not_started': '请先开始设置双重验证',
    'err.totp_off': '双重验证未开启', 'err.weak_password': '密码强度不够，请换一个', 'err.bad_operator_id': '用户名须为 2-64 位字母、数字或 . _ @ -，以字母或数字开头',
    'err.operator_exists': '该用户名已被占用', 'err.last_admin': '这是最后一位可登录的管理员：请先设置另一位管理员',
    'err.unknown_operator': '没有此操作员', 'err.unknown_machine': '没有此设备', 'err.bad_machine_id': '设备编号须为 1-64 位字母、数字、- 或 _',
    'err.machine_exists': '此设备编号已存在', 'err.unknown_command': '没有此指令', 'err.unknown_session': '没有此订单',
    'err.unknown_user': '没有此用户', 'err.account_deleted': '此账户已注销，个人信息已删除', 'err.below_zero': '调整后余额不能低于零',
    'err.unknown_alarm': '没有此告警', 'err.bad_period': '结束时间早于开始时间', 'err.bad_amount_range': '最小金额大于最大金额',
    'err.bad_cursor': '分页位置无效，请从第一页重新查询', 'err.bad_date': '日期格式应为 年-月-日（YYYY-MM-DD）',
    'err.period_too_long': '报表时间范围太长', 'err.unknown_gift': '没有此礼品', 'err.stock_below_zero': '库存不能低于零',
    'err.out_of_stock': '此礼品已无库存', 'err.unknown_redemption': '没有此兑换记录', 'err.already_picked_up': '此礼品已经领取过了',
    'err.insufficient_points': '积分不足', 'err.no_registration': '此用户尚未实名登记', 'err.no_photo': '没有保存的证件照片（未上传或已删除）',
    'err.not_pending': '此实名登记已处理过', 'err.reason_required': '请填写驳回原因（用户会看到）', 'err.document_in_use': '此证件已登记在另一个账户下',
    'err.not_settled': '只有已结算的订单可以退款', 'err.bad_refund': '退款金额超出可退金额', 'err.not_refundable': '这部分余额无法原路退回',
    'err.not_reconciled': '该日账单尚未对账', 'err.already_paid': '此退款已标记为已支付', 'err.provider_unavailable': '支付平台暂时无法确认，请稍后再试',
    'err.unknown_refund': '支付平台不认识此退款', 'err.unknown_order': '支付平台不认识此订单',
    'err.no_release': '没有此版本', 'err.withdrawn': '此版本已撤回', 'err.no_machine': '有设备编号不存在', 'err.targets': '请选择设备，或填写比例（二选一）',
    'err.no_machines': '按此比例没有选中任何设备', 'err.machine_in_rollout': '有设备已在另一个未结束的推送批次中', 'err.no_rollout': '没有此推送批次',
    'err.rollout_state': '推送批次当前状态不允许此操作', 'err.not_offered': '此版本未推送给该设备', 'err.version_exists': '此版本号已上传过',
    'err.bundle_too_large': '升级包太大', 'err.empty': '文件是空的', 'err.content_type': '请以文件方式上传升级包', 'err.body_too_large': '提交的内容太大',
    'err.session_changed': '订单刚刚有变化，请重新查看', 'err.session_over': '订单已结束', 'err.retry': '订单正在变化，请再试一次',
    'err.busy': '服务器忙，请稍后再试', 'err.draining': '此服务器正在重启，请稍后再试', 'err.database_busy': '数据库繁忙，请稍后再试',
    'err.database_unavailable': '数据库暂时无法连接，请稍后再试', 'err.internal': '服务器内部错误，已记录，请重试',
    'err.invalid_request': '输入有误', 'err.not_found': '找不到要操作的对象', 'err.method_not_allowed': '请求有误',
    'time.never': '从未', 'time.seconds': '{n} 秒前', 'time.minutes': '{n} 分钟前', 'time.hours': '{n} 小时前', 'time.days': '{n} 天前',
  },
  en: {
    ok: 'OK', cancel: 'Cancel', csv: 'Export CSV', 'chart.time': 'Time', 'chart.day': 'Day', 'table.empty': 'Nothing here', 'table.all': 'Select all', loading: 'Loading…',
    'err.network': 'Network error: check the connection and try again', 'err.required': 'Please fill in: {field}',
    'time.never': 'never', 'time.seconds': '{n} s ago', 'time.minutes': '{n} min ago', 'time.hours': '{n} h ago', 'time.days': '{n} days ago',
  },
});
