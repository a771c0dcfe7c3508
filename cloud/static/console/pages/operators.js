// Operators (admins only): who may use the console, with which role; create, re-role, disable or enable, reset a
// password or a second factor, unlock, sign out everywhere. The server checks the admin role on every request.
import { t, addStrings, api, h, clear, table, dialog, act, heading, when, ago } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'ops.title': '操作员', 'ops.new': '新建操作员', 'ops.id': '用户名', 'ops.display': '姓名', 'ops.role': '角色',
    'ops.password': '初始密码（至少 10 个字符）', 'ops.state': '状态', 'ops.totp': '两步验证', 'ops.seen': '最近活动',
    'ops.sessions': '在线登录', 'ops.enabled': '正常', 'ops.disabled': '已停用', 'ops.locked': '已锁定', 'ops.token': '脚本令牌',
    'ops.on': '已开启', 'ops.off': '未开启', 'ops.edit': '修改', 'ops.disable': '停用', 'ops.enable': '启用',
    'ops.reset_pw': '重置密码', 'ops.reset_totp': '重置两步验证', 'ops.unlock': '解锁', 'ops.signout': '退出所有登录',
    'ops.created': '已创建操作员 {id}', 'ops.saved': '已保存', 'ops.disable_text': '停用后 {id} 立即退出所有登录，脚本令牌也失效。',
    'ops.new_pw': '新密码（至少 10 个字符）', 'ops.actions': '操作', 'ops.yes': '有', 'ops.no': '无',
  },
  en: {
    'ops.title': 'Operators', 'ops.new': 'New operator', 'ops.id': 'Name', 'ops.display': 'Full name', 'ops.role': 'Role',
    'ops.password': 'First password (at least 10 characters)', 'ops.state': 'State', 'ops.totp': 'Two-step', 'ops.seen': 'Last active',
    'ops.sessions': 'Signed in', 'ops.enabled': 'Active', 'ops.disabled': 'Disabled', 'ops.locked': 'Locked', 'ops.token': 'Script token',
    'ops.on': 'On', 'ops.off': 'Off', 'ops.edit': 'Edit', 'ops.disable': 'Disable', 'ops.enable': 'Enable',
    'ops.reset_pw': 'Reset password', 'ops.reset_totp': 'Reset two-step', 'ops.unlock': 'Unlock', 'ops.signout': 'Sign out everywhere',
    'ops.created': 'Operator {id} created', 'ops.saved': 'Saved', 'ops.disable_text': '{id} is signed out at once and their script token stops working.',
    'ops.new_pw': 'New password (at least 10 characters)', 'ops.actions': 'Actions', 'ops.yes': 'yes', 'ops.no': 'no',
  },
});

const ROLES = ['viewer', 'operator', 'reviewer', 'admin'];
const change = (id, body) => api('PATCH', `/api/v1/console/operators/${encodeURIComponent(id)}`, body);

export async function render(root) {
  const { operators } = await api('GET', '/api/v1/console/operators');
  const roleOptions = ROLES.map((r) => [r, t(`role.${r}`)]);
  const actions = (o) => h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'secondary small', onclick: async () => {
      if (await dialog({ title: `${t('ops.edit')} ${o.operator_id}`, fields: [
        { name: 'display_name', label: t('ops.display'), value: o.display_name, maxlength: 100 },
        { name: 'role', label: t('ops.role'), type: 'select', options: roleOptions, value: o.role }],
      submit: (v) => change(o.operator_id, v) })) refresh();
    } }, t('ops.edit')),
    o.disabled
      ? h('button', { type: 'button', class: 'secondary small', onclick: () => act(() => change(o.operator_id, { disabled: false }), t('ops.saved')).then(refresh) }, t('ops.enable'))
      : h('button', { type: 'button', class: 'secondary small', onclick: async () => {
        if (await dialog({ title: `${t('ops.disable')} ${o.operator_id}`, text: t('ops.disable_text', { id: o.operator_id }), danger: true,
          ok: t('ops.disable'), submit: () => change(o.operator_id, { disabled: true }) })) refresh();
      } }, t('ops.disable')),
    h('button', { type: 'button', class: 'secondary small', onclick: async () => {
      if (await dialog({ title: `${t('ops.reset_pw')} ${o.operator_id}`, fields: [
        { name: 'password', label: t('ops.new_pw'), type: 'password', required: true, autocomplete: 'new-password' }],
      submit: (v) => change(o.operator_id, v) })) refresh();
    } }, t('ops.reset_pw')),
    o.totp_enabled ? h('button', { type: 'button', class: 'secondary small', onclick: () => act(() => change(o.operator_id, { reset_totp: true }), t('ops.saved')).then(refresh) }, t('ops.reset_totp')) : null,
    o.locked ? h('button', { type: 'button', class: 'secondary small', onclick: () => act(() => change(o.operator_id, { unlock: true }), t('ops.saved')).then(refresh) }, t('ops.unlock')) : null,
    o.sessions ? h('button', { type: 'button', class: 'secondary small', onclick: () => act(() => api('POST', `/api/v1/console/operators/${encodeURIComponent(o.operator_id)}/logout-everywhere`), t('ops.saved')).then(refresh) }, t('ops.signout')) : null);
  const newOne = h('button', { type: 'button', id: 'new-operator', onclick: async () => {
    const made = await dialog({ title: t('ops.new'), fields: [
      { name: 'operator_id', label: t('ops.id'), required: true, maxlength: 64 },
      { name: 'display_name', label: t('ops.display'), maxlength: 100 },
      { name: 'role', label: t('ops.role'), type: 'select', options: roleOptions, value: 'viewer' },
      { name: 'password', label: t('ops.password'), type: 'password', required: true, autocomplete: 'new-password' }],
    submit: (v) => api('POST', '/api/v1/console/operators', v) });
    if (made) refresh();
  } }, t('ops.new'));
  clear(root, heading(t('ops.title'), newOne), table({
    rowKey: 'operator_id', rows: operators, sortKey: 'operator_id',
    columns: [
      { key: 'operator_id', label: t('ops.id'), wrap: true },
      { key: 'display_name', label: t('ops.display'), wrap: true },
      { key: 'role', label: t('ops.role'), render: (o) => h('span', { class: 'chip' }, t(`role.${o.role}`)) },
      { key: 'disabled', label: t('ops.state'), render: (o) => h('span', { class: `chip ${o.disabled || o.locked ? 'bad' : 'ok'}` },
        o.disabled ? t('ops.disabled') : o.locked ? t('ops.locked') : t('ops.enabled')) },
      { key: 'totp_enabled', label: t('ops.totp'), render: (o) => (o.totp_enabled ? t('ops.on') : t('ops.off')) },
      { key: 'has_token', label: t('ops.token'), render: (o) => (o.has_token ? t('ops.yes') : t('ops.no')) },
      { key: 'sessions', label: t('ops.sessions'), num: true },
      { key: 'last_seen_ms', label: t('ops.seen'), render: (o) => h('span', { title: when(o.last_seen_ms) }, o.last_seen_ms ? ago(o.last_seen_ms) : '–') },
      { key: 'actions', label: t('ops.actions'), sort: false, render: actions },
    ] }));
}
