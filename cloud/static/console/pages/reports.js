// Reports: revenue, litres and sessions of a period (this month, last month, the last 7 or 30 days, or chosen days),
// per day, machine or site; charts of revenue and litres per day, a table with its totals, and the same as CSV.
// Days are China time, the server's; a session counts on the day it started (see cloud/reports/service.py).
import { t, addStrings, api, h, clear, table, heading, fen, litres, qs, csvLink, chart, css, day, ApiError } from '../lib.js';

addStrings({
  zh: {
    'rep.title': '报表', 'rep.this_month': '本月', 'rep.last_month': '上月', 'rep.7d': '最近 7 天', 'rep.30d': '最近 30 天',
    'rep.from': '开始日期', 'rep.to': '结束日期（含）', 'rep.show': '查询', 'rep.period': '{from} 至 {to}（北京时间），共 {n} 天。',
    'rep.by_day': '按日', 'rep.by_machine': '按设备', 'rep.by_site': '按站点',
    'rep.day': '日期', 'rep.machine': '设备', 'rep.location': '位置', 'rep.site': '站点', 'rep.machines': '设备数',
    'rep.sessions': '用水次数', 'rep.litres': '用水量', 'rep.revenue': '收入', 'rep.refunds': '退款', 'rep.net': '净收入',
    'rep.refunded': '{fen}（{n} 笔）', 'rep.total': '合计', 'rep.nosite': '未分组',
    'rep.chart_revenue': '每日收入（元）', 'rep.chart_litres': '每日用水量（升）', 'rep.yuan': '元',
    'rep.note': '按用水开始的日期统计已结算的用水；退款计入其用水所在的日期、设备和站点。',
  },
  en: {
    'rep.title': 'Reports', 'rep.this_month': 'This month', 'rep.last_month': 'Last month', 'rep.7d': 'Last 7 days', 'rep.30d': 'Last 30 days',
    'rep.from': 'From', 'rep.to': 'To (incl.)', 'rep.show': 'Show', 'rep.period': '{from} to {to} (China time), {n} days.',
    'rep.by_day': 'By day', 'rep.by_machine': 'By machine', 'rep.by_site': 'By site',
    'rep.day': 'Day', 'rep.machine': 'Machine', 'rep.location': 'Location', 'rep.site': 'Site', 'rep.machines': 'Machines',
    'rep.sessions': 'Sessions', 'rep.litres': 'Water', 'rep.revenue': 'Revenue', 'rep.refunds': 'Refunds', 'rep.net': 'Net revenue',
    'rep.refunded': '{fen} ({n})', 'rep.total': 'Total', 'rep.nosite': 'No site',
    'rep.chart_revenue': 'Revenue per day (CNY)', 'rep.chart_litres': 'Water per day (litres)', 'rep.yuan': 'CNY',
    'rep.note': 'Settled sessions, on the day they started; a refund counts on the day, machine and site of its session.',
  },
});

const PERIODS = ['this_month', 'last_month', '7d', '30d'];
const BYS = ['day', 'machine', 'site'];
const DAY_MS = 86400000;

/** yyyy-mm-dd moved by ``n`` days (calendar arithmetic in UTC: no time zone can shift it). */
function addDays(iso, n) { return new Date(Date.parse(`${iso}T00:00:00Z`) + n * DAY_MS).toISOString().slice(0, 10); }

/** The first and last day of a named period, today being China's today. */
function period(name, today) {
  const monthStart = `${today.slice(0, 8)}01`;
  if (name === 'last_month') return [`${addDays(monthStart, -1).slice(0, 8)}01`, addDays(monthStart, -1)];
  if (name === '7d') return [addDays(today, -6), today];
  if (name === '30d') return [addDays(today, -29), today];
  return [monthStart, today];
}

export async function render(root, parts, query) {
  css('reports');
  const by = BYS.includes(query.get('by')) ? query.get('by') : 'day';
  const today = day(Date.now());
  const name = query.get('period') === 'custom' || PERIODS.includes(query.get('period')) ? query.get('period') : 'this_month';
  const [from, to] = name === 'custom' ? [query.get('from') || today, query.get('to') || today] : period(name, today);
  const link = (changes) => `#/reports${qs({ period: name, from: name === 'custom' ? from : '', to: name === 'custom' ? to : '', by, ...changes })}`;

  const inputs = { from: h('input', { type: 'date', id: 'from', value: from, max: '9999-12-31' }),
    to: h('input', { type: 'date', id: 'to', value: to, max: '9999-12-31' }) };
  const form = h('form', { class: 'filters', id: 'report-period' },
    h('div', { class: 'periods', role: 'group', 'aria-label': t('rep.title') }, PERIODS.map((p) => h('a', {
      href: link({ period: p, from: '', to: '' }), id: `period-${p}`, class: p === name ? 'button' : 'button secondary',
      'aria-current': p === name ? 'true' : null }, t(`rep.${p}`)))),
    h('label', {}, t('rep.from'), inputs.from), h('label', {}, t('rep.to'), inputs.to),
    h('button', { type: 'submit', id: 'show', class: name === 'custom' ? '' : 'secondary' }, t('rep.show')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = link({ period: 'custom', from: inputs.from.value, to: inputs.to.value });
  });
  const tabs = h('nav', { class: 'tabs', 'aria-label': t('rep.title') }, BYS.map((b) => h('a', {
    href: link({ by: b }), id: `by-${b}`, 'aria-current': b === by ? 'page' : null }, t(`rep.by_${b}`))));
  const params = { from, to, by };
  let r;
  try {
    r = await api('GET', `/api/v1/operator/reports${qs(params)}`);
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 422) throw e;
    clear(root, heading(t('rep.title')), form, h('p', { class: 'card bad', role: 'alert', id: 'report-error' }, e.message));
    return;
  }
  const tot = r.totals;
  const stats = h('div', { class: 'stats', id: 'report-totals' },
    stat(t('rep.sessions'), tot.sessions.toLocaleString()), stat(t('rep.litres'), litres(tot.volume_ml)),
    stat(t('rep.revenue'), fen(tot.revenue_fen)), stat(t('rep.refunds'), fen(tot.refunded_fen)), stat(t('rep.net'), fen(tot.net_fen)));
  const revenueChart = h('div', { id: 'chart-revenue' });
  const litresChart = h('div', { id: 'chart-litres' });
  clear(root, heading(t('rep.title'), csvLink('/api/v1/operator/reports', params)), form,
    h('p', { class: 'muted small', id: 'report-period-text' }, t('rep.period', { from: r.from_day, to: r.to_day, n: r.days.length }), ' ', t('rep.note')),
    stats,
    h('div', { class: 'cols' }, h('section', { class: 'card' }, h('h2', {}, t('rep.chart_revenue')), revenueChart),
      h('section', { class: 'card' }, h('h2', {}, t('rep.chart_litres')), litresChart)),
    tabs, table({ rows: r.rows, rowKey: 'key', columns: columns(by), foot: { ...tot, key: '', total: true },
      sortKey: by === 'day' ? 'day' : by === 'machine' ? 'machine_id' : '' }));
  const xs = r.days.map((d) => d.start_ms);
  chart(revenueChart, { xs, bars: true, days: true, height: 220,
    series: [{ label: t('rep.revenue'), values: r.days.map((d) => d.revenue_fen / 100), color: '#0a66c2', unit: t('rep.yuan') }] });
  chart(litresChart, { xs, bars: true, days: true, height: 220,
    series: [{ label: t('rep.litres'), values: r.days.map((d) => Math.round(d.volume_ml / 100) / 10), color: '#1a7f37', unit: 'L' }] });
}

function stat(label, value) { return h('div', { class: 'stat' }, h('b', {}, value), h('span', {}, label)); }

function columns(by) {
  const label = (r, fn) => (r.total ? h('b', {}, t('rep.total')) : fn(r));
  const first = {
    day: [{ key: 'day', label: t('rep.day'), render: (r) => label(r, () => h('span', { class: 'nowrap' }, r.day)) }],
    machine: [
      { key: 'machine_id', label: t('rep.machine'), render: (r) => label(r, () => h('a', { href: `#/machines/${encodeURIComponent(r.machine_id)}` }, r.machine_id)) },
      { key: 'location', label: t('rep.location'), wrap: true, render: (r) => (r.total ? '' : r.location) },
      { key: 'site', label: t('rep.site'), wrap: true, render: (r) => (r.total ? '' : r.site || h('span', { class: 'muted' }, t('rep.nosite'))) }],
    site: [
      { key: 'site', label: t('rep.site'), wrap: true, render: (r) => label(r, () => r.site || h('span', { class: 'muted' }, t('rep.nosite'))) },
      { key: 'machines', label: t('rep.machines'), num: true, render: (r) => (r.total ? '' : String(r.machines)) }],
  }[by];
  return [...first,
    { key: 'sessions', label: t('rep.sessions'), num: true, render: (r) => r.sessions.toLocaleString() },
    { key: 'volume_ml', label: t('rep.litres'), num: true, render: (r) => litres(r.volume_ml) },
    { key: 'revenue_fen', label: t('rep.revenue'), num: true, render: (r) => fen(r.revenue_fen) },
    { key: 'refunded_fen', label: t('rep.refunds'), num: true, render: (r) => (r.refunded_fen
      ? t('rep.refunded', { fen: fen(r.refunded_fen), n: r.refunded_sessions }) : fen(0)) },
    { key: 'net_fen', label: t('rep.net'), num: true, render: (r) => h('b', {}, fen(r.net_fen)) }];
}
