// The fleet (the console's first page): every machine at a glance with what its heartbeats say, the fleet's
// figures on top (each a filter), a filter bar and search, columns sorted by the server (the rows are one page of
// many), the same search as CSV, and a new price for the machines ticked (operators and up; the server checks).
import { t, addStrings, api, h, clear, table, dialog, toast, heading, ago, when, fen, qs, csvLink, can, css } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'fleet.title': '设备', 'fleet.machines': '设备总数', 'fleet.online_share': '在线率 {pct}', 'fleet.offline': '离线',
    'fleet.with_alarms': '有未处理告警', 'fleet.with_lockouts': '已锁定', 'fleet.mismatches': '屏显价格不一致',
    'fleet.q': '搜索', 'fleet.q_hint': '设备编号、位置或站点', 'fleet.online': '在线', 'fleet.any': '全部',
    'fleet.is_online': '在线', 'fleet.is_offline': '离线', 'fleet.state': '状态', 'fleet.site': '站点',
    'fleet.has_alarms': '有告警', 'fleet.has_lockouts': '有锁定', 'fleet.price_mismatch': '价格不一致',
    'fleet.search': '查询', 'fleet.reset': '清除条件', 'fleet.machine': '设备', 'fleet.location': '位置',
    'fleet.alarms': '告警', 'fleet.price': '单价', 'fleet.shown': '屏显 {price}', 'fleet.version': '软件版本',
    'fleet.outbox': '待发 / 死信', 'fleet.outbox_title': '发件箱中待上报的记录 / 多次上报失败的死信', 'fleet.status': '在线 / 状态', 'fleet.temp': '水温', 'fleet.tds': 'TDS', 'fleet.consumables': '滤芯 / 紫外灯',
    'fleet.due': '需更换', 'fleet.bulk': '批量改价（{n} 台）', 'fleet.bulk_title': '为 {n} 台设备设置新单价',
    'fleet.bulk_text': '新单价立即用于新的用水，并发送到设备屏幕：{ids}', 'fleet.price_yuan': '新单价（元/升）',
    'fleet.bulk_done': '已为 {n} 台设备设置新单价 {price}/升', 'fleet.range': '第 {from}–{to} 台，共 {total} 台',
    'fleet.prev': '上一页', 'fleet.next': '下一页', 'fleet.never': '从未上线', 'fleet.not_enrolled': '未注册',
    'state.idle': '空闲', 'state.dispensing': '出水中', 'state.settling': '结算中', 'state.receipt': '显示账单',
    'state.offline': '断网', 'state.out_of_service': '暂停服务', 'state.maintenance': '维护中',
    'lockout.leak_sensor': '漏水', 'lockout.ghost_flow': '异常流量', 'lockout.operator': '远程停用',
    'lockout.temperature': '水温异常', 'lockout.tds': 'TDS 超标', 'lockout.low_water': '缺水', 'lockout.fault': '故障：{what}',
  },
  en: {
    'fleet.title': 'Machines', 'fleet.machines': 'Machines', 'fleet.online_share': 'Online {pct}', 'fleet.offline': 'Offline',
    'fleet.with_alarms': 'With open alarms', 'fleet.with_lockouts': 'Locked out', 'fleet.mismatches': 'Screen price differs',
    'fleet.q': 'Search', 'fleet.q_hint': 'Machine, location or site', 'fleet.online': 'Online', 'fleet.any': 'Any',
    'fleet.is_online': 'Online', 'fleet.is_offline': 'Offline', 'fleet.state': 'State', 'fleet.site': 'Site',
    'fleet.has_alarms': 'Alarms', 'fleet.has_lockouts': 'Lockouts', 'fleet.price_mismatch': 'Price differs',
    'fleet.search': 'Search', 'fleet.reset': 'Clear', 'fleet.machine': 'Machine', 'fleet.location': 'Location',
    'fleet.alarms': 'Alarms', 'fleet.price': 'Price', 'fleet.shown': 'screen {price}', 'fleet.version': 'Software',
    'fleet.outbox': 'Outbox', 'fleet.outbox_title': 'Reports waiting in the outbox / dead letters', 'fleet.status': 'Status', 'fleet.temp': 'Water', 'fleet.tds': 'TDS', 'fleet.consumables': 'Filter / UV',
    'fleet.due': 'due', 'fleet.bulk': 'Change price ({n})', 'fleet.bulk_title': 'New price for {n} machines',
    'fleet.bulk_text': 'New sessions use it at once and the machines show it: {ids}', 'fleet.price_yuan': 'New price (yuan per litre)',
    'fleet.bulk_done': 'New price {price}/L set on {n} machines', 'fleet.range': '{from}–{to} of {total}',
    'fleet.prev': 'Previous', 'fleet.next': 'Next', 'fleet.never': 'never online', 'fleet.not_enrolled': 'not enrolled',
    'state.idle': 'Idle', 'state.dispensing': 'Dispensing', 'state.settling': 'Settling', 'state.receipt': 'Receipt',
    'state.offline': 'No link', 'state.out_of_service': 'Out of service', 'state.maintenance': 'Maintenance',
    'lockout.leak_sensor': 'Leak', 'lockout.ghost_flow': 'Ghost flow', 'lockout.operator': 'Stopped remotely',
    'lockout.temperature': 'Temperature', 'lockout.tds': 'TDS too high', 'lockout.low_water': 'Low water', 'lockout.fault': 'Fault: {what}',
  },
});

const PAGE = 100;
const FILTERS = ['q', 'online', 'state', 'site', 'has_alarms', 'has_lockouts', 'price_mismatch'];

/** Shared with the machine page: how a state, a lockout, a reading is shown. */
export function stateChip(state, online) {
  if (!state) return h('span', { class: 'chip' }, '–');
  const key = `state.${state}`;
  const cls = !online ? '' : state === 'out_of_service' ? 'bad' : state === 'idle' || state === 'dispensing' ? 'ok' : 'amber';
  return h('span', { class: `chip ${cls}` }, t(key) === key ? state : t(key));
}
export function lockoutLabel(reason) {
  if (reason.startsWith('fault:')) return t('lockout.fault', { what: reason.slice(6) });
  const key = `lockout.${reason}`;
  return t(key) === key ? reason : t(key);
}
export function onlineChip(m) {
  return h('span', { class: `chip ${m.online ? 'ok' : 'bad'}` }, m.online ? t('fleet.is_online') : t('fleet.is_offline'));
}
export const temp = (c) => (c === null || c === undefined ? '–' : `${c.toFixed(1)} °C`);
export const tds = (ppm) => (ppm === null || ppm === undefined ? '–' : `${ppm} ppm`);
export const permille = (v) => (v === null || v === undefined ? '–' : `${Math.round(v / 10)}%`);
export function priceCell(m, inline = false) {
  return h('span', { class: inline ? 'inline-price' : 'stack end' }, fen(m.price_fen_per_l),
    m.price_mismatch ? h('span', { class: 'chip bad mismatch', title: t('fleet.price_mismatch') }, t('fleet.shown', { price: fen(m.displayed_price_fen_per_l) })) : null);
}

export async function render(root, parts, query) {
  css('fleet');
  const f = Object.fromEntries(FILTERS.map((k) => [k, query.get(k) || '']));
  const sort = query.get('sort') || 'machine_id';
  const order = query.get('order') === 'desc' ? 'desc' : 'asc';
  const offset = Math.max(0, Number.parseInt(query.get('offset') || '0', 10) || 0);
  const search = { ...f, sort, order };
  const data = await api('GET', `/api/v1/operator/fleet${qs({ ...search, offset, limit: PAGE })}`);
  const go = (changes) => { location.hash = `#/fleet${qs({ ...search, offset: '', ...changes })}`; };

  const s = data.stats;
  const stat = (value, label, filter, id) => h('a', { class: 'stat', href: `#/fleet${qs(filter)}`, id },
    h('b', {}, String(value)), h('span', {}, label));
  const stats = h('div', { class: 'stats' },
    stat(s.machines, t('fleet.machines'), {}, 'stat-machines'),
    stat(`${s.online}/${s.machines}`, t('fleet.online_share', { pct: s.online_share_pct === null ? '–' : `${s.online_share_pct}%` }), { online: 'online' }, 'stat-online'),
    stat(s.offline, t('fleet.offline'), { online: 'offline' }, 'stat-offline'),
    stat(s.with_alarms, t('fleet.with_alarms'), { has_alarms: 'true' }, 'stat-alarms'),
    stat(s.with_lockouts, t('fleet.with_lockouts'), { has_lockouts: 'true' }, 'stat-lockouts'),
    stat(s.price_mismatches, t('fleet.mismatches'), { price_mismatch: 'true' }, 'stat-mismatch'));

  const select = (id, value, options) => h('select', { id, name: id },
    options.map(([v, l]) => h('option', { value: v, selected: v === value }, l)));
  const inputs = {
    q: h('input', { id: 'fleet-q', type: 'search', value: f.q, maxlength: 100, placeholder: t('fleet.q_hint') }),
    online: select('fleet-online', f.online, [['', t('fleet.any')], ['online', t('fleet.is_online')], ['offline', t('fleet.is_offline')]]),
    state: select('fleet-state', f.state, [['', t('fleet.any')], ...data.states.map((x) => [x, t(`state.${x}`) === `state.${x}` ? x : t(`state.${x}`)])]),
    site: select('fleet-site', f.site, [['', t('fleet.any')], ...data.sites.map((x) => [x, x])]),
    has_alarms: h('input', { id: 'fleet-alarms', type: 'checkbox', checked: !!f.has_alarms }),
    has_lockouts: h('input', { id: 'fleet-lockouts', type: 'checkbox', checked: !!f.has_lockouts }),
    price_mismatch: h('input', { id: 'fleet-mismatch', type: 'checkbox', checked: !!f.price_mismatch }),
  };
  const form = h('form', { class: 'filters', id: 'fleet-filters' },
    h('label', {}, t('fleet.q'), inputs.q), h('label', {}, t('fleet.online'), inputs.online),
    h('label', {}, t('fleet.state'), inputs.state), h('label', {}, t('fleet.site'), inputs.site),
    h('label', { class: 'inline' }, inputs.has_alarms, t('fleet.has_alarms')),
    h('label', { class: 'inline' }, inputs.has_lockouts, t('fleet.has_lockouts')),
    h('label', { class: 'inline' }, inputs.price_mismatch, t('fleet.price_mismatch')),
    h('button', { type: 'submit', id: 'fleet-search' }, t('fleet.search')),
    h('a', { class: 'button secondary', href: '#/fleet', id: 'fleet-reset' }, t('fleet.reset')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    go(Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.type === 'checkbox' ? (el.checked ? 'true' : '') : el.value.trim()])));
  });

  const mayPrice = can('operator');
  const tbl = table({
    rows: data.machines, rowKey: 'machine_id', select: mayPrice, sortKey: sort, sortDir: order === 'desc' ? -1 : 1,
    onSort: (key, dir) => go({ sort: key, order: dir < 0 ? 'desc' : 'asc' }),
    onRow: (m) => { location.hash = `#/machines/${encodeURIComponent(m.machine_id)}`; },
    columns: [
      { key: 'machine_id', label: t('fleet.machine'), wrap: true, render: (m) => h('span', { class: 'stack' },
        h('a', { href: `#/machines/${encodeURIComponent(m.machine_id)}`, class: 'mono' }, m.machine_id),
        m.site ? h('span', { class: 'small muted', title: t('fleet.site') }, m.site) : null) },
      { key: 'location', label: t('fleet.location'), wrap: true, render: (m) => h('span', { class: 'place' }, m.location || '–') },
      { key: 'last_seen_ms', label: t('fleet.status'), render: (m) => h('span', { class: 'stack', title: when(m.last_seen_ms) },
        h('span', {}, onlineChip(m), ' ', stateChip(m.state, m.online)),
        m.lockouts.map((x) => h('span', { class: 'chip bad' }, lockoutLabel(x))),
        h('span', { class: 'small muted nowrap' }, !m.enrolled ? t('fleet.not_enrolled') : m.last_seen_ms ? ago(m.last_seen_ms) : t('fleet.never'))) },
      { key: 'open_alarms', label: t('fleet.alarms'), num: true, render: (m) => (m.open_alarms
        ? h('a', { class: 'bad', href: `#/alarms${qs({ machine_id: m.machine_id })}` }, String(m.open_alarms)) : h('span', { class: 'muted' }, '0')) },
      { key: 'price_fen_per_l', label: t('fleet.price'), num: true, render: priceCell },
      { key: 'software_version', label: t('fleet.version'), render: (m) => h('span', { class: 'mono small' }, m.software_version || '–') },
      { key: 'outbox_depth', label: t('fleet.outbox'), num: true, render: (m) => h('span', { title: t('fleet.outbox_title') },
        m.outbox_depth ?? '–', ' / ', h('span', { class: m.dead_letters ? 'bad' : '' }, m.dead_letters ?? '–')) },
      { key: 'temp_c', label: t('fleet.temp'), num: true, render: (m) => temp(m.temp_c) },
      { key: 'tds_ppm', label: t('fleet.tds'), num: true, render: (m) => tds(m.tds_ppm) },
      { key: 'filter_used_permille', label: t('fleet.consumables'), num: true, render: (m) => h('span', {},
        h('span', { class: m.filter_due ? 'amber' : '' }, permille(m.filter_used_permille)), ' / ',
        h('span', { class: m.uv_due ? 'amber' : '' }, permille(m.uv_used_permille))) },
    ] });

  const bulk = h('button', { type: 'button', id: 'bulk-price', disabled: true, onclick: async () => {
    const ids = [...tbl.selected];
    const done = await dialog({ title: t('fleet.bulk_title', { n: ids.length }), text: t('fleet.bulk_text', { ids: ids.join(', ') }),
      fields: [{ name: 'price_yuan', label: t('fleet.price_yuan'), type: 'number', required: true, min: 0, max: 1000, step: 0.01 }],
      submit: (v) => api('POST', '/api/v1/operator/fleet/price', { machine_ids: ids, price_fen_per_l: Math.round(v.price_yuan * 100) }) });
    if (done) { toast(t('fleet.bulk_done', { n: done.machine_ids.length, price: fen(done.price_fen_per_l) })); refresh(); }
  } }, t('fleet.bulk', { n: 0 }));
  tbl.onselect = (sel) => { bulk.disabled = sel.size === 0; bulk.textContent = t('fleet.bulk', { n: sel.size }); };

  const last = Math.min(offset + PAGE, data.total);
  const pager = h('div', { class: 'pager' },
    h('span', { class: 'muted', id: 'fleet-range' }, t('fleet.range', { from: data.total ? offset + 1 : 0, to: last, total: data.total })),
    h('button', { type: 'button', class: 'secondary small', id: 'fleet-prev', disabled: offset === 0, onclick: () => go({ offset: Math.max(0, offset - PAGE) || '' }) }, t('fleet.prev')),
    h('button', { type: 'button', class: 'secondary small', id: 'fleet-next', disabled: last >= data.total, onclick: () => go({ offset: offset + PAGE }) }, t('fleet.next')));
  clear(root, heading(t('fleet.title'), mayPrice ? bulk : null, csvLink('/api/v1/operator/fleet', search)), stats, form, tbl, pager);
}
