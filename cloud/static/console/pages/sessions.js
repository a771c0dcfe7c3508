// Sessions (rental records): search by machine, user (id or phone), days, state, end reason and amount, newest
// first, paged on by the server's cursor; the same search as CSV. A record (#/sessions/<id>) shows the facts, the
// flow as volume and flow rate over time, temperatures, valve times, the bill and every fen that moved; operators
// and admins refund from it, and close a session stuck open (the hold is released; the server bills a late report).
import { t, addStrings, api, h, clear, table, dialog, toast, heading, when, day, fen, litres, qs, csvLink, chart,
  can, css, dayStartMs } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'ses.title': '用水记录', 'ses.machine': '设备', 'ses.user': '用户 ID 或手机号', 'ses.from': '从', 'ses.to': '到（含）',
    'ses.state': '状态', 'ses.reason': '结束原因', 'ses.min': '最低金额（元）', 'ses.max': '最高金额（元）', 'ses.amount_range': '金额（元）', 'ses.any': '全部',
    'ses.search': '查询', 'ses.clear': '清除', 'ses.when': '开始时间', 'ses.who': '用户', 'ses.volume': '水量', 'ses.fee': '金额',
    'ses.open': '查看', 'ses.more': '更早的记录', 'ses.count': '共 {n} 条', 'ses.count_more': '超过 {n} 条',
    'ses.scanned': '已查找到 {day}，更早的记录可能还有匹配', 'ses.search_on': '继续查找更早的记录',
    'state.starting': '启动中', 'state.active': '出水中', 'state.ended': '已结算', 'state.voided': '已作废', 'state.lost': '已失联',
    'state.open': '未结束（卡住）',
    'ses.back': '返回列表', 'ses.facts': '基本信息', 'ses.session': '记录号', 'ses.location': '位置', 'ses.phone': '手机号',
    'ses.created': '扫码开始', 'ses.claimed': '设备确认', 'ses.ended': '结束', 'ses.price': '单价', 'ses.credit': '预授权额度',
    'ses.void_reason': '作废/失联原因', 'ses.deleted': '已注销', 'ses.per_l': '{p}/升',
    'ses.flow': '流量曲线', 'ses.flow_volume': '累计水量', 'ses.flow_rate': '流速',
    'ses.flow_record': '设备上报的流量序列：{n} 个采样点（约每秒一个），从阀门打开算起。',
    'ses.flow_progress': '没有结束报告：只有出水时最后一次进度消息，曲线从阀门打开连到这条消息。',
    'ses.flow_none': '没有流量数据：设备没有上报这次出水。', 'ses.flow_few': '只有 {n} 个采样点，无法绘制曲线。',
    'ses.temps': '水温', 'ses.temp_start': '开始', 'ses.temp_end': '结束', 'ses.temp_min': '最低', 'ses.temp_max': '最高',
    'ses.temp_chart': '水温', 'ses.valve': '阀门开关', 'ses.valve_open': '打开', 'ses.valve_close': '关闭', 'ses.at': '时间',
    'ses.action': '动作', 'ses.why': '原因', 'ses.events': '设备事件', 'ses.event': '事件', 'ses.detail': '详情',
    'ses.no_valve': '没有阀门记录', 'ses.bill': '账单', 'ses.no_bill': '没有账单：此记录未结算，未扣费。',
    'ses.started_local': '开始（当地时间）', 'ses.ended_local': '结束（当地时间）', 'ses.duration': '时长',
    'ses.avg_flow': '平均流速', 'ses.points': '积分', 'ses.tds': 'TDS（限值）', 'ses.money': '资金',
    'ses.held': '预授权冻结', 'ses.released': '已解冻', 'ses.charged': '已扣费', 'ses.refunded': '已退款', 'ses.refundable': '可退款',
    'ses.to_original': '原路退回', 'ses.entries': '余额流水', 'ses.kind': '类型', 'ses.amount': '金额', 'ses.note': '备注',
    'ses.provider_refunds': '原路退款', 'ses.provider': '渠道', 'ses.refund_state': '状态',
    'ses.refund': '退款', 'ses.refund_title': '退款：{id}', 'ses.refund_amount': '退款金额（元，最多 {max}）',
    'ses.refund_to': '退到', 'ses.to_balance': '用户余额', 'ses.to_original_pay': '原支付渠道（不足部分退到余额）',
    'ses.refund_reason': '原因（记入审计日志）', 'ses.refunded_msg': '已退款 {amount}',
    'ses.close': '手动结束', 'ses.close_title': '手动结束：{id}',
    'ses.close_text': '设备一直没有上报此次出水的结束。结束后解冻预授权的 {credit}，不扣费，并通知设备停止出水；如果设备之后上报结束，系统按实际水量结算一次。',
    'ses.close_reason': '原因（记入审计日志）', 'ses.closed_msg': '已结束，解冻 {credit}',
    'ses.stuck': '此记录仍未结束：设备没有上报结束。', 'ses.seconds': '{n} 秒',
    'kind.topup': '充值', 'kind.hold': '冻结', 'kind.release': '解冻', 'kind.charge': '扣费', 'kind.refund': '退款',
    'kind.adjustment': '调整', 'kind.withdrawal': '提现/原路退回', 'kind.payout': '注销退款',
    'reason.stop_button': '按下停止按钮', 'reason.screen_stop': '屏幕停止', 'reason.phone_stop': '手机停止',
    'reason.credit_exhausted': '额度用完', 'reason.max_volume': '达到单次上限', 'reason.max_duration': '达到最长时间',
    'reason.idle': '长时间无水流', 'reason.cancelled': '已取消', 'reason.fault': '设备故障', 'reason.leak': '检测到漏水',
    'reason.shutdown': '设备关机', 'reason.power_loss': '断电',
  },
  en: {
    'ses.title': 'Rental records', 'ses.machine': 'Machine', 'ses.user': 'User ID or phone', 'ses.from': 'From', 'ses.to': 'To (incl.)',
    'ses.state': 'State', 'ses.reason': 'End reason', 'ses.min': 'Min amount (¥)', 'ses.max': 'Max amount (¥)', 'ses.amount_range': 'Amount (¥)', 'ses.any': 'Any',
    'ses.search': 'Search', 'ses.clear': 'Clear', 'ses.when': 'Started', 'ses.who': 'User', 'ses.volume': 'Volume', 'ses.fee': 'Amount',
    'ses.open': 'Open', 'ses.more': 'Older records', 'ses.count': '{n} records', 'ses.count_more': 'More than {n} records',
    'ses.scanned': 'Searched back to {day}; older records may match too', 'ses.search_on': 'Search older records',
    'state.starting': 'Starting', 'state.active': 'Pouring', 'state.ended': 'Settled', 'state.voided': 'Voided', 'state.lost': 'Lost',
    'state.open': 'Not ended (stuck)',
    'ses.back': 'Back to the list', 'ses.facts': 'Facts', 'ses.session': 'Record', 'ses.location': 'Location', 'ses.phone': 'Phone',
    'ses.created': 'Scanned and started', 'ses.claimed': 'Machine confirmed', 'ses.ended': 'Ended', 'ses.price': 'Price',
    'ses.credit': 'Credit held', 'ses.void_reason': 'Why voided or lost', 'ses.deleted': 'deleted', 'ses.per_l': '{p} per litre',
    'ses.flow': 'Flow', 'ses.flow_volume': 'Volume', 'ses.flow_rate': 'Flow rate',
    'ses.flow_record': 'The flow series the machine reported: {n} samples (about one a second), from the valve opening.',
    'ses.flow_progress': 'No end report: only the last progress message sent while pouring, drawn from the valve opening to it.',
    'ses.flow_none': 'No flow data: the machine reported nothing about this pour.', 'ses.flow_few': 'Only {n} sample: nothing to draw.',
    'ses.temps': 'Water temperature', 'ses.temp_start': 'Start', 'ses.temp_end': 'End', 'ses.temp_min': 'Lowest', 'ses.temp_max': 'Highest',
    'ses.temp_chart': 'Temperature', 'ses.valve': 'Valve', 'ses.valve_open': 'opened', 'ses.valve_close': 'closed', 'ses.at': 'Time',
    'ses.action': 'Action', 'ses.why': 'Why', 'ses.events': 'Machine events', 'ses.event': 'Event', 'ses.detail': 'Detail',
    'ses.no_valve': 'No valve records', 'ses.bill': 'Bill', 'ses.no_bill': 'No bill: this record was not settled and nothing was charged.',
    'ses.started_local': 'Started (local)', 'ses.ended_local': 'Ended (local)', 'ses.duration': 'Duration',
    'ses.avg_flow': 'Average flow', 'ses.points': 'Points', 'ses.tds': 'TDS (limit)', 'ses.money': 'Money',
    'ses.held': 'Held', 'ses.released': 'Released', 'ses.charged': 'Charged', 'ses.refunded': 'Refunded', 'ses.refundable': 'Refundable',
    'ses.to_original': 'Back to the payment', 'ses.entries': 'Balance entries', 'ses.kind': 'Kind', 'ses.amount': 'Amount', 'ses.note': 'Note',
    'ses.provider_refunds': 'Refunds to the payment', 'ses.provider': 'Provider', 'ses.refund_state': 'State',
    'ses.refund': 'Refund', 'ses.refund_title': 'Refund {id}', 'ses.refund_amount': 'Amount (¥, at most {max})',
    'ses.refund_to': 'Refund to', 'ses.to_balance': 'The user\u2019s balance', 'ses.to_original_pay': 'The original payment (the rest to the balance)',
    'ses.refund_reason': 'Reason (written to the audit log)', 'ses.refunded_msg': 'Refunded {amount}',
    'ses.close': 'Close', 'ses.close_title': 'Close {id}',
    'ses.close_text': 'The machine never reported the end of this pour. Closing releases the {credit} held, charges nothing and tells the machine to stop; if the machine reports the end later, it is billed once by the water measured.',
    'ses.close_reason': 'Reason (written to the audit log)', 'ses.closed_msg': 'Closed; {credit} released',
    'ses.stuck': 'This record has not ended: the machine has not reported its end.', 'ses.seconds': '{n} s',
    'kind.topup': 'Top-up', 'kind.hold': 'Hold', 'kind.release': 'Release', 'kind.charge': 'Charge', 'kind.refund': 'Refund',
    'kind.adjustment': 'Adjustment', 'kind.withdrawal': 'Withdrawal', 'kind.payout': 'Paid out (deleted)',
    'reason.stop_button': 'Stop button', 'reason.screen_stop': 'Screen stop', 'reason.phone_stop': 'Phone stop',
    'reason.credit_exhausted': 'Credit used up', 'reason.max_volume': 'Volume limit', 'reason.max_duration': 'Time limit',
    'reason.idle': 'No flow', 'reason.cancelled': 'Cancelled', 'reason.fault': 'Machine fault', 'reason.leak': 'Leak detected',
    'reason.shutdown': 'Machine shut down', 'reason.power_loss': 'Power loss',
  },
});

const REASONS = ['stop_button', 'screen_stop', 'phone_stop', 'credit_exhausted', 'max_volume', 'max_duration', 'idle',
  'cancelled', 'fault', 'leak', 'shutdown', 'power_loss'];
const STATES = ['open', 'ended', 'voided', 'lost', 'starting', 'active'];
const DAY_MS = 86400000;
const MAY_MOVE_MONEY = ['operator', 'admin'];

/** Words for a code if there are some (``prefix.code``), else the code itself. */
export function named(prefix, code) {
  if (!code) return '–';
  const k = `${prefix}.${code}`;
  const s = t(k);
  return s === k ? code : s;
}
export function stateChip(state) {
  const cls = state === 'ended' ? 'ok' : state === 'lost' ? 'bad' : state === 'voided' ? '' : 'amber';
  return h('span', { class: `chip ${cls}` }, named('state', state));
}
const yuanToFen = (v) => (v === '' || v === null || v === undefined ? '' : Math.round(Number(v) * 100));
const path = (id) => `/api/v1/operator/sessions/${encodeURIComponent(id)}`;

export async function render(root, parts, query) {
  css('sessions');
  if (parts[0]) return one(root, parts[0]);
  return list(root, query);
}

async function list(root, query) {
  const fresh = [...query.keys()].length === 0;        // first visit: the last 7 days
  const f = { machine: query.get('machine') || '', user: query.get('user') || '', state: query.get('state') || '',
    reason: query.get('reason') || '', min: query.get('min') || '', max: query.get('max') || '',
    from: fresh ? day(Date.now() - 6 * DAY_MS) : query.get('from') || '', to: fresh ? day(Date.now()) : query.get('to') || '' };
  const params = { machine_id: f.machine, user: f.user, state: f.state, end_reason: f.reason,
    from_ms: f.from ? dayStartMs(f.from) : '', to_ms: f.to ? dayStartMs(f.to) + DAY_MS : '',
    min_fen: yuanToFen(f.min), max_fen: yuanToFen(f.max) };
  const first = await api('GET', `/api/v1/operator/sessions${qs({ ...params, limit: 50 })}`);
  let rows = first.sessions;
  const inputs = {
    machine: h('input', { name: 'machine', value: f.machine, maxlength: 64, size: 10 }),
    user: h('input', { name: 'user', value: f.user, maxlength: 64, size: 16 }),
    from: h('input', { name: 'from', type: 'date', value: f.from }),
    to: h('input', { name: 'to', type: 'date', value: f.to }),
    state: h('select', { name: 'state' }, h('option', { value: '' }, t('ses.any')),
      STATES.map((s) => h('option', { value: s, selected: s === f.state }, named('state', s)))),
    reason: h('select', { name: 'reason' }, h('option', { value: '' }, t('ses.any')),
      REASONS.map((r) => h('option', { value: r, selected: r === f.reason }, named('reason', r)))),
    min: h('input', { name: 'min', type: 'number', min: 0, step: '0.01', value: f.min, class: 'money', 'aria-label': t('ses.min') }),
    max: h('input', { name: 'max', type: 'number', min: 0, step: '0.01', value: f.max, class: 'money', 'aria-label': t('ses.max') }),
  };
  const labels = { machine: 'ses.machine', user: 'ses.user', from: 'ses.from', to: 'ses.to', state: 'ses.state', reason: 'ses.reason' };
  const form = h('form', { class: 'filters', id: 'session-filters' },
    Object.entries(labels).map(([k, label]) => h('label', {}, t(label), inputs[k])),
    h('div', { class: 'field', role: 'group', 'aria-labelledby': 'amount-label' }, h('span', { id: 'amount-label' }, t('ses.amount_range')),
      h('div', { class: 'range' }, inputs.min, h('span', { 'aria-hidden': 'true' }, '–'), inputs.max)),
    h('button', { type: 'submit' }, t('ses.search')),
    h('a', { class: 'button secondary', href: '#/sessions?from=', id: 'clear-filters' }, t('ses.clear')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()]));
    location.hash = `#/sessions${qs(v) || '?from='}`;
  });
  const tbl = table({ rows, rowKey: 'session_id', columns: [
    { key: 'created_ms', label: t('ses.when'), render: (s) => h('a', { href: `#/sessions/${encodeURIComponent(s.session_id)}`, class: 'nowrap' }, when(s.created_ms)) },
    { key: 'machine_id', label: t('ses.machine'), wrap: true, render: (s) => [h('a', { href: `#/machines/${encodeURIComponent(s.machine_id)}` }, s.machine_id),
      s.location ? h('div', { class: 'small muted' }, s.location) : null] },
    { key: 'user_id', label: t('ses.who'), render: (s) => [h('a', { href: `#/users/${encodeURIComponent(s.user_id)}`, class: 'mono' }, s.user_id),
      h('div', { class: 'small muted' }, s.phone_masked || t('ses.deleted'))] },
    { key: 'state', label: t('ses.state'), render: (s) => stateChip(s.state) },
    { key: 'end_reason', label: t('ses.reason'), render: (s) => named('reason', s.end_reason) },
    { key: 'volume_ml', label: t('ses.volume'), num: true, render: (s) => litres(s.volume_ml) },
    { key: 'fee_fen', label: t('ses.fee'), num: true, render: (s) => fen(s.fee_fen) },
    { key: 'open', label: '', sort: false, render: (s) => h('a', { class: 'button secondary small', href: `#/sessions/${encodeURIComponent(s.session_id)}` }, t('ses.open')) },
  ] });
  const note = h('p', { class: 'muted small', id: 'scanned' });
  let next = first.next_before;
  const more = h('button', { type: 'button', class: 'secondary', id: 'more', onclick: async () => {
    const page = await api('GET', `/api/v1/operator/sessions${qs({ ...params, before: next, limit: 50 })}`);
    rows = rows.concat(page.sessions);
    tbl.redraw(rows);
    show(page);
  } });
  const show = (page) => {
    next = page.next_before;
    more.hidden = !next;
    more.textContent = page.scanned_to_ms ? t('ses.search_on') : t('ses.more');
    note.textContent = page.scanned_to_ms ? t('ses.scanned', { day: day(page.scanned_to_ms) }) : '';
  };
  show(first);
  const count = first.count === null ? '' : first.count_capped ? t('ses.count_more', { n: first.count }) : t('ses.count', { n: first.count });
  clear(root, heading(t('ses.title'), csvLink('/api/v1/operator/sessions', params)), form,
    h('p', { class: 'muted small', id: 'count' }, count), tbl, h('div', { class: 'pager' }, note, more));
}

async function one(root, id) {
  const r = await api('GET', path(id));
  const s = r.session;
  const m = r.money;
  const mayMoveMoney = can(null, MAY_MOVE_MONEY);
  const refund = async () => {
    const done = await dialog({ title: t('ses.refund_title', { id }), ok: t('ses.refund'), fields: [
      { name: 'amount', label: t('ses.refund_amount', { max: fen(m.refundable_fen) }), type: 'number', required: true,
        min: 0.01, max: m.refundable_fen / 100, step: '0.01', value: (m.refundable_fen / 100).toFixed(2), inputmode: 'decimal' },
      { name: 'to', label: t('ses.refund_to'), type: 'select', value: 'balance',
        options: [['balance', t('ses.to_balance')], ['original', t('ses.to_original_pay')]] },
      { name: 'reason', label: t('ses.refund_reason'), type: 'textarea', required: true, maxlength: 200 }],
    submit: (v) => api('POST', `${path(id)}/refund`, { amount_fen: Math.round(v.amount * 100), reason: v.reason, to: v.to }) });
    if (done) { toast(t('ses.refunded_msg', { amount: fen(done.refunded_fen - m.refunded_fen) })); refresh(); }
  };
  const close = async () => {
    const done = await dialog({ title: t('ses.close_title', { id }), danger: true, ok: t('ses.close'),
      text: t('ses.close_text', { credit: fen(s.credit_limit_fen) }),
      fields: [{ name: 'reason', label: t('ses.close_reason'), type: 'textarea', required: true, maxlength: 200 }],
      submit: (v) => api('POST', `${path(id)}/close`, { reason: v.reason }) });
    if (done) { toast(t('ses.closed_msg', { credit: fen(done.released_fen) })); refresh(); }
  };
  const actions = [
    mayMoveMoney && m.refundable_fen > 0 ? h('button', { type: 'button', id: 'refund', onclick: refund }, t('ses.refund')) : null,
    mayMoveMoney && r.stuck ? h('button', { type: 'button', class: 'danger', id: 'close-session', onclick: close }, t('ses.close')) : null,
  ];
  const fact = (label, value, attrs = {}) => [h('dt', {}, t(label)), h('dd', attrs, value ?? '–')];
  const facts = h('section', { class: 'card' }, h('h2', {}, t('ses.facts')), h('dl', { class: 'facts', id: 'facts' },
    fact('ses.session', s.session_id, { class: 'mono' }),
    fact('ses.state', stateChip(s.state)),
    fact('ses.machine', h('a', { href: `#/machines/${encodeURIComponent(s.machine_id)}` }, s.machine_id)),
    fact('ses.location', r.machine?.location || '–', { id: 'location' }),
    fact('ses.who', [h('a', { href: `#/users/${encodeURIComponent(s.user_id)}`, class: 'mono' }, s.user_id), ' ',
      h('span', { class: 'muted' }, r.user.deleted ? t('ses.deleted') : r.user.phone_masked)]),
    fact('ses.created', when(s.created_ms)),
    fact('ses.claimed', when(s.acked_ms)),
    fact('ses.ended', when(s.ended_ms)),
    s.end_reason ? fact('ses.reason', named('reason', s.end_reason)) : null,
    s.void_reason ? fact('ses.void_reason', s.void_reason, { class: 'wrap' }) : null,
    fact('ses.price', t('ses.per_l', { p: fen(s.price_fen_per_l) })),
    fact('ses.credit', fen(s.credit_limit_fen)),
    fact('ses.volume', litres(s.volume_ml)),
    fact('ses.fee', fen(s.fee_fen))),
  r.stuck ? h('p', { class: 'amber', role: 'note' }, t('ses.stuck')) : null);
  const money = h('section', { class: 'card', id: 'money' }, h('h2', {}, t('ses.money')),
    h('div', { class: 'stats' }, [['ses.held', m.held_fen], ['ses.released', m.released_fen], ['ses.charged', m.charged_fen],
      ['ses.refunded', m.refunded_fen], ['ses.refundable', m.refundable_fen], ['ses.to_original', m.to_original_fen]]
      .map(([k, v]) => h('div', { class: 'stat', id: `stat-${k.slice(4)}` }, h('b', {}, fen(v)), h('span', {}, t(k))))),
    h('h3', {}, t('ses.entries')),
    table({ rows: m.entries, rowKey: 'entry_id', columns: [
      { key: 'created_ms', label: t('ses.at'), render: (e) => h('span', { class: 'nowrap' }, when(e.created_ms)) },
      { key: 'kind', label: t('ses.kind'), render: (e) => named('kind', e.kind) },
      { key: 'amount_fen', label: t('ses.amount'), num: true, render: (e) => fen(e.amount_fen) },
      { key: 'note', label: t('ses.note'), wrap: true }] }),
    m.provider_refunds.length ? [h('h3', {}, t('ses.provider_refunds')), table({ rows: m.provider_refunds, rowKey: 'refund_id', columns: [
      { key: 'created_ms', label: t('ses.at'), render: (x) => h('span', { class: 'nowrap' }, when(x.created_ms)) },
      { key: 'provider', label: t('ses.provider') },
      { key: 'amount_fen', label: t('ses.amount'), num: true, render: (x) => fen(x.amount_fen) },
      { key: 'state', label: t('ses.refund_state'), render: (x) => h('span', { class: `chip ${x.state === 'success' ? 'ok' : x.state === 'abnormal' ? 'bad' : 'amber'}` }, x.state) },
      { key: 'reason', label: t('ses.why'), wrap: true }] })] : null);
  const flowBox = h('div', { id: 'flow-chart' });
  const f = r.flow;
  const flowNote = f.source === 'none' ? t('ses.flow_none') : f.t_ms.length < 2 ? t('ses.flow_few', { n: f.t_ms.length })
    : t(f.source === 'record' ? 'ses.flow_record' : 'ses.flow_progress', { n: f.samples });
  const temps = f.temp_c.filter((x) => x !== null);
  const tempBox = h('div', { id: 'temp-chart' });
  const tp = r.temperatures;
  const deg = (c) => (c === null || c === undefined ? '–' : `${Number(c).toFixed(1)} °C`);
  const flowCard = h('section', { class: 'card' }, h('h2', {}, t('ses.flow')), h('p', { class: 'muted small', id: 'flow-note' }, flowNote),
    f.t_ms.length >= 2 ? flowBox : null);
  const tempCard = h('section', { class: 'card' }, h('h2', {}, t('ses.temps')),
    h('dl', { class: 'facts' }, fact('ses.temp_start', deg(tp.start_c)), fact('ses.temp_end', deg(tp.end_c)),
      fact('ses.temp_min', deg(tp.min_c)), fact('ses.temp_max', deg(tp.max_c))),
    temps.length >= 2 ? tempBox : null);
  const valveCard = h('section', { class: 'card' }, h('h2', {}, t('ses.valve')),
    r.valve.length ? table({ rows: r.valve.map((v, i) => ({ ...v, i })), rowKey: 'i', columns: [
      { key: 'at_ms', label: t('ses.at'), render: (v) => h('span', { class: 'nowrap' }, when(v.at_ms)) },
      { key: 'action', label: t('ses.action'), render: (v) => (v.action === 'open' ? t('ses.valve_open') : v.action === 'close' ? t('ses.valve_close') : v.action) },
      { key: 'reason', label: t('ses.why'), render: (v) => (v.reason ? named('reason', v.reason) : '') }] })
      : h('p', { class: 'muted' }, t('ses.no_valve')),
    r.events.length ? [h('h3', {}, t('ses.events')), table({ rows: r.events.map((e, i) => ({ ...e, i })), rowKey: 'i', columns: [
      { key: 'at_ms', label: t('ses.at'), render: (e) => h('span', { class: 'nowrap' }, when(e.at_ms)) },
      { key: 'kind', label: t('ses.event'), render: (e) => h('span', { class: `mono ${e.alarm ? 'bad' : ''}` }, e.kind) },
      { key: 'detail', label: t('ses.detail'), sort: false, wrap: true, render: (e) => h('span', { class: 'mono small' }, JSON.stringify(e.detail)) }] })] : null);
  const b = r.bill;
  const billCard = h('section', { class: 'card', id: 'bill' }, h('h2', {}, t('ses.bill')), b ? h('dl', { class: 'facts' },
    fact('ses.started_local', b.started_local, { class: 'nowrap' }), fact('ses.ended_local', b.ended_local, { class: 'nowrap' }),
    fact('ses.duration', t('ses.seconds', { n: (b.duration_ms / 1000).toFixed(1) })),
    fact('ses.volume', litres(b.volume_ml)), fact('ses.avg_flow', `${b.avg_flow_ml_per_min} ml/min`),
    fact('ses.price', t('ses.per_l', { p: fen(b.price_fen_per_l) })), fact('ses.fee', fen(b.amount_fen)),
    fact('ses.points', String(b.points)),
    b.water_quality?.tds_ppm !== undefined ? fact('ses.tds', `${b.water_quality.tds_ppm ?? '–'} ppm (≤ ${b.water_quality.tds_limit_ppm ?? '–'})`) : null)
    : h('p', { class: 'muted' }, t('ses.no_bill')));
  clear(root, heading(`${t('ses.title')} · ${id}`, ...actions, h('a', { class: 'button secondary', href: '#/sessions' }, t('ses.back'))),
    h('div', { class: 'cols' }, facts, money), flowCard, h('div', { class: 'cols' }, billCard, tempCard, valveCard));
  if (f.t_ms.length >= 2) {
    chart(flowBox, { xs: f.t_ms, series: [
      { label: t('ses.flow_volume'), values: f.volume_ml, color: '#0a66c2', unit: 'ml' },
      { label: t('ses.flow_rate'), values: f.flow_ml_per_min, color: '#1a7f37', unit: 'ml/min' }] });
  }
  if (temps.length >= 2) {
    chart(tempBox, { xs: f.t_ms, height: 180, series: [{ label: t('ses.temp_chart'), values: f.temp_c, color: '#c62828', unit: '°C' }] });
  }
}
