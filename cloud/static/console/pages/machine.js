// One machine (#/machines/<id>): its facts, charts of temperature, TDS and litres per hour (24 h / 7 days), its open
// alarms, event log, the commands sent with what became of them, and its latest sessions. Operators change its price,
// place, time zone and hotline, take it out of service and back, and clear a lockout remotely; admins issue an
// enrolment token and revoke its key. Only the buttons a role may use are shown; the server checks every request.
import { state, t, addStrings, api, h, clear, table, dialog, toast, heading, when, clock, ago, fen, litres, chart, can, css, qs } from '../lib.js';
import { refresh } from '../app.js';
import { stateChip, lockoutLabel, onlineChip, temp, tds, permille, priceCell } from './fleet.js';

addStrings({
  zh: {
    'mach.back': '返回设备列表', 'mach.facts': '概况', 'mach.site': '站点', 'mach.location': '位置', 'mach.online': '连接',
    'mach.last_seen': '最近心跳', 'mach.state': '状态', 'mach.lockouts': '锁定', 'mach.none': '无', 'mach.price': '单价',
    'mach.version': '软件版本', 'mach.outbox': '待上报 / 死信', 'mach.temp': '水温', 'mach.tds': 'TDS', 'mach.filter': '滤芯使用',
    'mach.uv': '紫外灯使用', 'mach.tz': '时区', 'mach.hotline': '服务电话', 'mach.enrolled': '设备密钥', 'mach.yes_key': '已注册',
    'mach.no_key': '未注册（需要注册令牌）', 'mach.created': '创建时间', 'mach.session': '当前用水', 'mach.limits': '单次限制',
    'mach.limits_text': '最多 {vol}，{min} 分钟，{credit}', 'mach.due': '需更换',
    'mach.trends': '趋势', 'mach.24h': '24 小时', 'mach.7d': '7 天', 'mach.chart_temp': '水温（°C）', 'mach.chart_tds': 'TDS（ppm）',
    'mach.chart_litres': '每小时出水量（升）· 共 {total}', 'mach.nodata': '此时段没有心跳数据', 'mach.litres': '出水量',
    'mach.alarms': '未处理告警', 'mach.rule': '规则', 'mach.severity': '级别', 'mach.opened': '开始', 'mach.alarm_state': '状态',
    'mach.events': '事件记录', 'mach.when': '时间', 'mach.kind': '类型', 'mach.detail': '详情', 'mach.more': '更早的事件', 'mach.alarm': '告警',
    'mach.commands': '下发指令', 'mach.command': '指令', 'mach.sent': '下发', 'mach.delivered': '送达', 'mach.result': '结果',
    'mach.acked': '已执行', 'mach.refused': '被拒绝：{why}', 'mach.waiting': '等待设备', 'mach.expired': '已过期未送达',
    'mach.sessions': '最近用水记录', 'mach.started': '开始', 'mach.user': '用户', 'mach.volume': '水量', 'mach.fee': '费用',
    'mach.end_reason': '结束原因', 'mach.session_id': '记录编号', 'mach.session_state': '状态',
    'cmd.price': '改价 {price}/升', 'cmd.out_of_service': '暂停服务', 'cmd.in_service': '恢复服务', 'cmd.clear_lockout': '解除锁定：{what}',
    'cmd.start': '开始用水', 'cmd.cancel': '停止用水',
    'act.price': '修改单价', 'act.out': '暂停服务', 'act.in': '恢复服务', 'act.clear': '解除锁定', 'act.edit': '编辑信息',
    'act.token': '发放注册令牌', 'act.revoke': '吊销设备密钥', 'act.price_yuan': '单价（元/升）', 'act.reason': '原因（记入审计日志）',
    'act.out_text': '设备完成当前用水后停止服务，屏幕显示服务电话。', 'act.in_text': '解除远程停用，设备恢复服务。',
    'act.lockout': '要解除的锁定', 'act.site_only': '（须到现场处理）', 'act.sent': '已发送到设备', 'act.saved': '已保存',
    'act.tz': '时区（如 Asia/Shanghai）', 'act.token_text': '新的注册令牌 7 天内有效，只能使用一次。原有密钥仍然有效，直到被吊销。',
    'act.token_once': '注册令牌只显示这一次，请复制后交给安装设备的技术人员：', 'act.copy': '复制', 'act.copied': '已复制',
    'act.done': '完成', 'act.revoke_text': '吊销后设备 {id} 的所有请求立即被拒绝，需要新的注册令牌才能重新注册。',
    'act.revoked': '已吊销设备密钥',
    'severity.critical': '严重', 'severity.warning': '警告', 'severity.info': '提示', 'alarm.open': '未处理', 'alarm.acknowledged': '已确认',
    'session.starting': '启动中', 'session.active': '出水中', 'session.ended': '已结束', 'session.voided': '已作废', 'session.lost': '已丢失',
    'end.stop_button': '按下停止键', 'end.credit_exhausted': '余额用尽', 'end.max_volume': '达到水量上限', 'end.max_duration': '达到时长上限',
    'end.idle': '长时间无水流', 'end.cancelled': '已取消', 'end.fault': '故障', 'end.leak': '漏水', 'end.shutdown': '设备关机', 'end.power_loss': '断电',
  },
  en: {
    'mach.back': 'All machines', 'mach.facts': 'Facts', 'mach.site': 'Site', 'mach.location': 'Location', 'mach.online': 'Link',
    'mach.last_seen': 'Last heartbeat', 'mach.state': 'State', 'mach.lockouts': 'Lockouts', 'mach.none': 'none', 'mach.price': 'Price',
    'mach.version': 'Software', 'mach.outbox': 'Outbox / dead letters', 'mach.temp': 'Water', 'mach.tds': 'TDS', 'mach.filter': 'Filter use',
    'mach.uv': 'UV lamp use', 'mach.tz': 'Time zone', 'mach.hotline': 'Hotline', 'mach.enrolled': 'Machine key', 'mach.yes_key': 'enrolled',
    'mach.no_key': 'not enrolled (needs an enrolment token)', 'mach.created': 'Created', 'mach.session': 'Session now', 'mach.limits': 'Limits',
    'mach.limits_text': 'at most {vol}, {min} min, {credit}', 'mach.due': 'due',
    'mach.trends': 'Trends', 'mach.24h': '24 hours', 'mach.7d': '7 days', 'mach.chart_temp': 'Water temperature (°C)', 'mach.chart_tds': 'TDS (ppm)',
    'mach.chart_litres': 'Litres per hour · {total} in all', 'mach.nodata': 'No heartbeats in this period', 'mach.litres': 'Poured',
    'mach.alarms': 'Open alarms', 'mach.rule': 'Rule', 'mach.severity': 'Severity', 'mach.opened': 'Opened', 'mach.alarm_state': 'State',
    'mach.events': 'Event log', 'mach.when': 'When', 'mach.kind': 'Kind', 'mach.detail': 'Detail', 'mach.more': 'Older events', 'mach.alarm': 'alarm',
    'mach.commands': 'Commands', 'mach.command': 'Command', 'mach.sent': 'Sent', 'mach.delivered': 'Delivered', 'mach.result': 'Result',
    'mach.acked': 'Done', 'mach.refused': 'Refused: {why}', 'mach.waiting': 'Waiting for the machine', 'mach.expired': 'Expired undelivered',
    'mach.sessions': 'Latest sessions', 'mach.started': 'Started', 'mach.user': 'User', 'mach.volume': 'Volume', 'mach.fee': 'Fee',
    'mach.end_reason': 'End reason', 'mach.session_id': 'Session', 'mach.session_state': 'State',
    'cmd.price': 'Price {price}/L', 'cmd.out_of_service': 'Out of service', 'cmd.in_service': 'Back in service', 'cmd.clear_lockout': 'Clear lockout: {what}',
    'cmd.start': 'Start', 'cmd.cancel': 'Stop',
    'act.price': 'Change price', 'act.out': 'Out of service', 'act.in': 'Back in service', 'act.clear': 'Clear lockout', 'act.edit': 'Edit details',
    'act.token': 'Enrolment token', 'act.revoke': 'Revoke key', 'act.price_yuan': 'Price (yuan per litre)', 'act.reason': 'Reason (kept in the audit log)',
    'act.out_text': 'The machine stops serving once the current session ends; its screen shows the hotline.', 'act.in_text': 'Lifts the remote stop: the machine serves again.',
    'act.lockout': 'Lockout to clear', 'act.site_only': ' (on site only)', 'act.sent': 'Sent to the machine', 'act.saved': 'Saved',
    'act.tz': 'Time zone (e.g. Asia/Shanghai)', 'act.token_text': 'A new enrolment token is valid for 7 days and works once. The current key keeps working until it is revoked.',
    'act.token_once': 'This token is shown only now: copy it for the technician who enrols the machine:', 'act.copy': 'Copy', 'act.copied': 'Copied',
    'act.done': 'Done', 'act.revoke_text': 'Every request of machine {id} is refused at once; it needs a new enrolment token to enrol again.',
    'act.revoked': 'Machine key revoked',
    'severity.critical': 'Critical', 'severity.warning': 'Warning', 'severity.info': 'Info', 'alarm.open': 'Open', 'alarm.acknowledged': 'Acknowledged',
    'session.starting': 'Starting', 'session.active': 'Pouring', 'session.ended': 'Ended', 'session.voided': 'Voided', 'session.lost': 'Lost',
    'end.stop_button': 'Stop button', 'end.credit_exhausted': 'Credit used up', 'end.max_volume': 'Volume limit', 'end.max_duration': 'Time limit',
    'end.idle': 'No flow', 'end.cancelled': 'Cancelled', 'end.fault': 'Fault', 'end.leak': 'Leak', 'end.shutdown': 'Shut down', 'end.power_loss': 'Power loss',
  },
});

const SITE_ONLY = ['leak_sensor'];
const GAP_SAMPLES = 7;            // a line breaks where more than half an hour of samples is missing (the machine was off)

export async function render(root, parts, query, { crumb }) {
  css('fleet');
  const id = parts[0] || '';
  const base = `/api/v1/operator/fleet/${encodeURIComponent(id)}`;
  const [m, ev, cmds, sess] = await Promise.all([api('GET', base), api('GET', `${base}/events?limit=50`),
    api('GET', `${base}/commands`), api('GET', `${base}/sessions`)]);
  crumb.textContent = `${t('nav.fleet')} / ${m.machine_id}`;
  const machinePath = `/api/v1/operator/machines/${encodeURIComponent(m.machine_id)}`;

  const facts = h('section', { class: 'card', id: 'facts' }, h('h2', {}, t('mach.facts')), h('dl', { class: 'facts' },
    fact(t('mach.site'), m.site || '–', 'fact-site'), fact(t('mach.location'), m.location || '–', 'fact-location'),
    fact(t('mach.online'), h('span', {}, onlineChip(m), ' ', h('span', { class: 'small muted' }, m.last_seen_ms ? `${t('mach.last_seen')} ${ago(m.last_seen_ms)} · ${when(m.last_seen_ms)}` : ''))),
    fact(t('mach.state'), stateChip(m.state, m.online), 'fact-state'),
    fact(t('mach.lockouts'), m.lockouts.length ? h('span', {}, m.lockouts.map((x) => h('span', { class: 'chip bad' }, lockoutLabel(x)))) : t('mach.none'), 'fact-lockouts'),
    fact(t('mach.price'), priceCell(m, true), 'fact-price'),
    fact(t('mach.version'), h('span', { class: 'mono' }, m.software_version || '–')),
    fact(t('mach.outbox'), `${m.outbox_depth ?? '–'} / ${m.dead_letters ?? '–'}`),
    fact(t('mach.temp'), temp(m.temp_c), 'fact-temp'), fact(t('mach.tds'), tds(m.tds_ppm), 'fact-tds'),
    fact(t('mach.filter'), h('span', { class: m.filter_due ? 'amber' : '' }, permille(m.filter_used_permille), m.filter_due ? ` · ${t('mach.due')}` : '')),
    fact(t('mach.uv'), h('span', { class: m.uv_due ? 'amber' : '' }, permille(m.uv_used_permille), m.uv_due ? ` · ${t('mach.due')}` : '')),
    fact(t('mach.tz'), m.timezone, 'fact-tz'), fact(t('mach.hotline'), m.hotline || '–', 'fact-hotline'),
    fact(t('mach.limits'), t('mach.limits_text', { vol: litres(m.limits.max_volume_ml), min: Math.round(m.limits.max_duration_ms / 60000), credit: fen(m.limits.max_credit_fen) })),
    fact(t('mach.enrolled'), m.enrolled ? t('mach.yes_key') : h('span', { class: 'bad' }, t('mach.no_key')), 'fact-key'),
    fact(t('mach.session'), m.open_session_id ? h('a', { href: `#/sessions/${encodeURIComponent(m.open_session_id)}`, class: 'mono' }, m.open_session_id) : t('mach.none')),
    fact(t('mach.created'), when(m.created_ms))));

  const alarms = m.alarms.length ? h('section', { class: 'card', id: 'alarms' }, h('h2', {}, h('a', { href: `#/alarms${qs({ machine_id: m.machine_id })}` }, t('mach.alarms'))), table({
    rows: m.alarms, rowKey: 'alarm_id', columns: [
      { key: 'rule', label: t('mach.rule'), render: (a) => h('a', { href: `#/alarms/${a.alarm_id}` }, state.lang === 'zh' ? a.title_zh : a.title_en) },
      { key: 'severity', label: t('mach.severity'), render: (a) => h('span', { class: `chip ${a.severity === 'critical' ? 'bad' : 'amber'}` }, label('severity', a.severity)) },
      { key: 'state', label: t('mach.alarm_state'), render: (a) => label('alarm', a.state) },
      { key: 'opened_ms', label: t('mach.opened'), render: (a) => when(a.opened_ms) },
      { key: 'detail', label: t('mach.detail'), sort: false, wrap: true, render: (a) => h('span', { class: 'mono small' }, brief(a.detail)) },
    ] })) : null;

  const chartsBox = h('div', { class: 'charts', id: 'charts' });
  const rangeButtons = ['24h', '7d'].map((r) => h('button', { type: 'button', id: `range-${r}`, class: 'small secondary',
    'aria-pressed': 'false', onclick: () => {
      history.replaceState(null, '', `#/machines/${encodeURIComponent(m.machine_id)}${r === '7d' ? '?range=7d' : ''}`);   // kept on refresh
      drawCharts(chartsBox, base, r, rangeButtons);
    } }, t(`mach.${r}`)));
  const trends = h('section', { class: 'card' }, h('div', { class: 'charthead' }, h('h2', {}, t('mach.trends')), rangeButtons), chartsBox);

  let events = ev.events; let next = ev.next_offset;
  const evTable = table({ rows: events, rowKey: 'id', columns: [
    { key: 'received_ms', label: t('mach.when'), render: (e) => h('span', { class: 'nowrap', title: `${t('mach.when')}: ${when(e.occurred_ms)}` }, when(e.received_ms)) },
    { key: 'kind', label: t('mach.kind'), render: (e) => h('span', {}, h('span', { class: 'mono' }, e.kind), e.alarm ? [' ', h('span', { class: 'chip bad' }, t('mach.alarm'))] : null) },
    { key: 'detail', label: t('mach.detail'), sort: false, wrap: true, render: (e) => h('span', { class: 'mono small' }, brief(e.payload?.detail ?? e.payload)) },
  ] });
  const more = h('button', { type: 'button', class: 'secondary', id: 'events-more', hidden: next === null, onclick: async () => {
    const page = await api('GET', `${base}/events${qs({ offset: next, limit: 50 })}`);
    events = events.concat(page.events); next = page.next_offset; more.hidden = next === null; evTable.redraw(events);
  } }, t('mach.more'));

  const now = Date.now();
  const cmdTable = table({ rows: cmds.commands, rowKey: 'command_id', columns: [
    { key: 'created_ms', label: t('mach.sent'), render: (c) => h('span', { class: 'nowrap' }, when(c.created_ms)) },
    { key: 'kind', label: t('mach.command'), wrap: true, render: commandLabel },
    { key: 'delivered_ms', label: t('mach.delivered'), render: (c) => (c.delivered_ms ? clock(c.delivered_ms) : '–') },
    { key: 'acked_ms', label: t('mach.result'), render: (c) => (c.ack_ok === true
      ? h('span', { class: 'chip ok', title: when(c.acked_ms) }, `${t('mach.acked')} ${clock(c.acked_ms)}`)
      : c.ack_ok === false ? h('span', { class: 'chip bad', title: when(c.acked_ms) }, t('mach.refused', { why: c.ack_reason || '–' }))
        : c.expires_ms < now ? h('span', { class: 'chip' }, t('mach.expired')) : h('span', { class: 'chip amber' }, t('mach.waiting'))) },
  ] });

  const sessTable = table({ rows: sess.sessions, rowKey: 'session_id', columns: [
    { key: 'session_id', label: t('mach.session_id'), render: (s) => h('a', { class: 'mono', href: `#/sessions/${encodeURIComponent(s.session_id)}` }, s.session_id) },
    { key: 'created_ms', label: t('mach.started'), render: (s) => h('span', { class: 'nowrap' }, when(s.created_ms)) },
    { key: 'state', label: t('mach.session_state'), render: (s) => h('span', { class: `chip ${s.state === 'ended' ? 'ok' : s.state === 'active' ? 'amber' : ''}` }, label('session', s.state)) },
    { key: 'volume_ml', label: t('mach.volume'), num: true, render: (s) => litres(s.volume_ml) },
    { key: 'fee_fen', label: t('mach.fee'), num: true, render: (s) => fen(s.fee_fen) },
    { key: 'end_reason', label: t('mach.end_reason'), render: (s) => (s.end_reason ? label('end', s.end_reason) : '–') },
    { key: 'user_id', label: t('mach.user'), render: (s) => h('a', { class: 'mono small', href: `#/users/${encodeURIComponent(s.user_id)}` }, s.user_id) },
  ] });

  clear(root, heading(m.machine_id, ...actions(m, machinePath)),
    h('p', {}, h('a', { href: '#/fleet', id: 'back' }, `← ${t('mach.back')}`)),
    facts, alarms, trends,
    h('section', { class: 'card', id: 'commands' }, h('h2', {}, t('mach.commands')), cmdTable),
    h('section', { class: 'card', id: 'sessions' }, h('h2', {}, t('mach.sessions')), sessTable),
    h('section', { class: 'card', id: 'events' }, h('h2', {}, t('mach.events')), evTable, h('div', { class: 'pager' }, more)));
  await drawCharts(chartsBox, base, query.get('range') === '7d' ? '7d' : '24h', rangeButtons);
}

/** The words for a code (``severity.critical``, ``session.ended``, ...), or the code itself when there are none. */
function label(kind, code) {
  const key = `${kind}.${code}`;
  return t(key) === key ? code : t(key);
}

function fact(label, value, id) {
  return [h('dt', {}, label), h('dd', { id }, value)];
}

/** A JSON value in one short line (details of events and alarms; text, never markup). */
function brief(v) {
  if (v === null || v === undefined) return '';
  const s = typeof v === 'string' ? v : JSON.stringify(v);
  return s.length > 240 ? `${s.slice(0, 239)}…` : s;
}

function commandLabel(c) {
  const b = c.body || {};
  const key = `cmd.${c.kind}`;
  const label = t(key, { price: fen(b.price_fen_per_l), what: lockoutLabel(b.reason || '') });
  const note = b.detail || (c.kind === 'cancel' ? b.reason : '');
  return h('span', {}, label === key ? c.kind : label, note ? h('span', { class: 'small muted' }, ` · ${note}`) : null);
}

/** The three charts for ``range`` (24h or 7d), fetched again each time the range changes. */
async function drawCharts(box, base, range, buttons) {
  for (const b of buttons) {
    const on = b.id === `range-${range}`;
    b.className = on ? 'small' : 'small secondary';
    b.setAttribute('aria-pressed', String(on));
  }
  const s = await api('GET', `${base}/series?range=${range}`);
  const { xs, temps, tdss } = withGaps(s, s.sample_every_ms * GAP_SAMPLES);
  const total = s.hours.litres.reduce((a, b) => a + b, 0);
  const cards = [
    ['chart-temp', t('mach.chart_temp'), temps.length && temps.some((v) => v !== null)
      ? { xs, series: [{ label: t('mach.temp'), values: temps, color: '#c2410c', unit: '°C' }] } : null],
    ['chart-tds', t('mach.chart_tds'), tdss.some((v) => v !== null)
      ? { xs, series: [{ label: 'TDS', values: tdss, color: '#0a66c2', unit: 'ppm' }] } : null],
    ['chart-litres', t('mach.chart_litres', { total: `${total.toFixed(2)} L` }),
      { xs: s.hours.at_ms, bars: true, series: [{ label: t('mach.litres'), values: s.hours.litres, color: '#1a7f37', unit: 'L' }] }],
  ].map(([id, title, spec]) => {
    const el = h('div', { id });
    return { el, spec, card: h('div', { class: `card ${id === 'chart-litres' ? 'wide' : ''}` }, h('h3', {}, title),
      spec ? el : h('p', { class: 'muted nodata' }, t('mach.nodata'))) };
  });
  clear(box, cards.map((c) => c.card));
  for (const c of cards) if (c.spec) chart(c.el, { ...c.spec, height: 220 });
}

/** The samples over the whole period (empty points at its ends, so every chart spans the same hours), with an empty
 *  point where the machine was silent (the line breaks there): longer than ``gapMs`` and than 3 of the usual
 *  spacing, so samples that are sparse but regular (a fleet's demo data) still make a line. */
function withGaps({ samples, from_ms: from, to_ms: to }, gapMs) {
  const xs = [from]; const temps = [null]; const tdss = [null];
  const steps = samples.at_ms.slice(1).map((x, i) => x - samples.at_ms[i]).sort((a, b) => a - b);
  gapMs = Math.max(gapMs, 3 * (steps[Math.floor(steps.length / 2)] || 0));
  const put = (x, temp, tds) => {
    if (x === xs[xs.length - 1]) { xs.pop(); temps.pop(); tdss.pop(); }    // a sample right at the start
    xs.push(x); temps.push(temp); tdss.push(tds);
  };
  samples.at_ms.forEach((x, i) => {
    if (i && x - samples.at_ms[i - 1] > gapMs) put(samples.at_ms[i - 1] + 1, null, null);
    put(x, samples.temp_c[i], samples.tds_ppm[i]);
  });
  if (to > xs[xs.length - 1]) put(to, null, null);
  return { xs, temps, tdss };
}

function actions(m, path) {
  const out = [];
  const id = m.machine_id;
  const after = (msg) => (r) => { if (r) { toast(msg); refresh(); } };
  const reasonField = { name: 'detail', label: t('act.reason'), type: 'textarea', required: true, maxlength: 500 };
  if (can('operator')) {
    out.push(h('button', { type: 'button', id: 'act-price', onclick: () => dialog({ title: `${t('act.price')} · ${id}`,
      fields: [{ name: 'price_yuan', label: t('act.price_yuan'), type: 'number', required: true, min: 0, max: 1000, step: 0.01, value: (m.price_fen_per_l / 100).toFixed(2) }],
      submit: (v) => api('PATCH', path, { price_fen_per_l: Math.round(v.price_yuan * 100) }) }).then(after(t('act.saved'))) }, t('act.price')));
    out.push(h('button', { type: 'button', class: 'secondary', id: 'act-edit', onclick: () => dialog({ title: `${t('act.edit')} · ${id}`, fields: [
      { name: 'location', label: t('mach.location'), value: m.location, maxlength: 200 },
      { name: 'site', label: t('mach.site'), value: m.site, maxlength: 100 },
      { name: 'timezone', label: t('act.tz'), value: m.timezone, required: true, maxlength: 64 },
      { name: 'hotline', label: t('mach.hotline'), value: m.hotline, maxlength: 40, inputmode: 'tel' }],
    submit: (v) => api('PATCH', path, v) }).then(after(t('act.saved'))) }, t('act.edit')));
    out.push(h('button', { type: 'button', class: 'secondary', id: 'act-out', onclick: () => dialog({ title: `${t('act.out')} · ${id}`, text: t('act.out_text'),
      fields: [reasonField], ok: t('act.out'), danger: true,
      submit: (v) => api('POST', `${path}/service`, { in_service: false, detail: v.detail }) }).then(after(t('act.sent'))) }, t('act.out')));
    out.push(h('button', { type: 'button', class: 'secondary', id: 'act-in', onclick: () => dialog({ title: `${t('act.in')} · ${id}`, text: t('act.in_text'),
      fields: [reasonField], ok: t('act.in'),
      submit: (v) => api('POST', `${path}/service`, { in_service: true, detail: v.detail }) }).then(after(t('act.sent'))) }, t('act.in')));
    if (m.lockouts.length) {
      out.push(h('button', { type: 'button', class: 'secondary', id: 'act-clear', onclick: () => dialog({ title: `${t('act.clear')} · ${id}`, fields: [
        { name: 'reason', label: t('act.lockout'), type: 'select', value: m.lockouts.find((x) => !SITE_ONLY.includes(x)) || m.lockouts[0],
          options: m.lockouts.map((x) => [x, lockoutLabel(x) + (SITE_ONLY.includes(x) ? t('act.site_only') : '')]) },
        { ...reasonField, name: 'note' }],
      submit: (v) => api('POST', `${path}/clear-lockout`, v) }).then(after(t('act.sent'))) }, t('act.clear')));
    }
  }
  if (can('admin')) {
    out.push(h('button', { type: 'button', class: 'secondary', id: 'act-token', onclick: async () => {
      const made = await dialog({ title: `${t('act.token')} · ${id}`, text: t('act.token_text'), ok: t('act.token'),
        submit: () => api('POST', `${path}/enrolment-token`) });
      if (made) showToken(made.enrolment_token);
    } }, t('act.token')));
    out.push(h('button', { type: 'button', class: 'danger', id: 'act-revoke', onclick: () => dialog({ title: `${t('act.revoke')} · ${id}`,
      text: t('act.revoke_text', { id }), ok: t('act.revoke'), danger: true,
      submit: () => api('POST', `${path}/revoke-key`) }).then(after(t('act.revoked'))) }, t('act.revoke')));
  }
  return out;
}

/** The enrolment token, once, with a button that copies it. */
function showToken(token) {
  const field = h('input', { id: 'token-value', readonly: true, value: token, 'aria-label': t('act.token') });
  const copy = h('button', { type: 'button', class: 'secondary', id: 'token-copy', onclick: async () => {
    field.select();
    try { await navigator.clipboard.writeText(token); } catch (e) { document.execCommand('copy'); }
    toast(t('act.copied'));
  } }, t('act.copy'));
  const dlg = h('dialog', { 'aria-label': t('act.token'), id: 'token-dialog' }, h('form', { method: 'dialog' },
    h('h2', {}, t('act.token')), h('p', {}, t('act.token_once')), h('div', { class: 'token' }, field, copy),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'token-done' }, t('act.done')))));
  dlg.addEventListener('close', () => { dlg.remove(); refresh(); });
  document.body.append(dlg);
  dlg.showModal();
  field.select();
}
