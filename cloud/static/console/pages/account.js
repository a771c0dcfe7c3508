// My account: who I am, my password, my second factor (TOTP), and signing out on every computer.
import { state, t, addStrings, api, h, clear, dialog, toast, act, heading, trustedSvg } from '../lib.js';

addStrings({
  zh: {
    'acct.title': '我的账户', 'acct.name': '用户名', 'acct.role': '角色', 'acct.password': '修改密码', 'acct.current': '当前密码',
    'acct.new': '新密码（至少 10 个字符）', 'acct.again': '再次输入新密码', 'acct.mismatch': '两次输入的新密码不一致',
    'acct.changed': '密码已修改，您在其他电脑上的登录已退出', 'acct.totp': '两步验证', 'acct.totp_on': '已开启：登录时需要身份验证器中的验证码。',
    'acct.totp_off': '未开启。建议开启：即使密码泄露，他人也无法登录。', 'acct.totp_start': '开启两步验证', 'acct.totp_stop': '关闭两步验证',
    'acct.totp_scan': '用身份验证器（如 Google Authenticator、Microsoft Authenticator）扫描二维码，或手动输入密钥：',
    'acct.totp_code': '身份验证器显示的 6 位验证码', 'acct.totp_confirm': '确认开启', 'acct.totp_enabled': '两步验证已开启',
    'acct.totp_disabled': '两步验证已关闭', 'acct.everywhere': '在所有设备上退出', 'acct.everywhere_text': '结束您在所有电脑和平板上的控制台登录（包括这台）。',
    'acct.everywhere_done': '已退出 {n} 个登录', 'acct.totp_password': '请先输入您的密码。', 'acct.next': '下一步',
  },
  en: {
    'acct.title': 'My account', 'acct.name': 'Name', 'acct.role': 'Role', 'acct.password': 'Change password', 'acct.current': 'Current password',
    'acct.new': 'New password (at least 10 characters)', 'acct.again': 'New password again', 'acct.mismatch': 'The two new passwords differ',
    'acct.changed': 'Password changed; your sign-ins on other computers have ended', 'acct.totp': 'Two-step verification',
    'acct.totp_on': 'On: signing in needs the code from your authenticator app.', 'acct.totp_off': 'Off. Turn it on: a leaked password is then not enough to sign in.',
    'acct.totp_start': 'Turn on two-step verification', 'acct.totp_stop': 'Turn off two-step verification',
    'acct.totp_scan': 'Scan the QR code with an authenticator app (Google Authenticator, Microsoft Authenticator, ...) or type the key:',
    'acct.totp_code': 'The 6-digit code the app shows', 'acct.totp_confirm': 'Confirm', 'acct.totp_enabled': 'Two-step verification is on',
    'acct.totp_disabled': 'Two-step verification is off', 'acct.everywhere': 'Sign out everywhere',
    'acct.everywhere_text': 'End your console sign-ins on every computer and tablet, this one included.', 'acct.everywhere_done': '{n} sign-ins ended',
    'acct.totp_password': 'Enter your password first.', 'acct.next': 'Next',
  },
});

export async function render(root) {
  const { operator: me } = await api('GET', '/api/v1/console/me');
  state.me = me;
  const password = h('form', { class: 'stack', id: 'password-form' });
  const fields = { current: h('input', { type: 'password', autocomplete: 'current-password', required: true, id: 'pw-current' }),
    new: h('input', { type: 'password', autocomplete: 'new-password', required: true, minlength: 10, id: 'pw-new' }),
    again: h('input', { type: 'password', autocomplete: 'new-password', required: true, id: 'pw-again' }) };
  const err = h('div', { class: 'field-error', role: 'alert' });
  clear(password, h('label', {}, t('acct.current'), fields.current), h('label', {}, t('acct.new'), fields.new),
    h('label', {}, t('acct.again'), fields.again), err, h('div', { class: 'actions' }, h('button', { type: 'submit' }, t('acct.password'))));
  password.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    if (fields.new.value !== fields.again.value) { err.textContent = t('acct.mismatch'); return; }
    try {
      await api('POST', '/api/v1/console/password', { current: fields.current.value, new: fields.new.value });
      for (const f of Object.values(fields)) f.value = '';
      toast(t('acct.changed'));
    } catch (x) { err.textContent = x.message; }
  });

  const totpBox = h('div', { id: 'totp' });
  const drawTotp = (on) => clear(totpBox, h('p', {}, on ? t('acct.totp_on') : t('acct.totp_off')),
    h('div', { class: 'actions' }, on
      ? h('button', { type: 'button', class: 'secondary', id: 'totp-stop', onclick: stopTotp }, t('acct.totp_stop'))
      : h('button', { type: 'button', id: 'totp-start', onclick: startTotp }, t('acct.totp_start'))));
  async function startTotp() {
    const setup = await dialog({ title: t('acct.totp_start'), text: t('acct.totp_password'), ok: t('acct.next'), fields: [
      { name: 'password', label: t('acct.current'), type: 'password', required: true, autocomplete: 'current-password' }],
    submit: (v) => api('POST', '/api/v1/console/totp/setup', v) });
    if (!setup) return;
    const code = h('input', { inputmode: 'numeric', maxlength: 6, id: 'totp-code', autocomplete: 'one-time-code' });
    const e2 = h('div', { class: 'field-error', role: 'alert' });
    clear(totpBox, h('p', {}, t('acct.totp_scan')), h('div', { class: 'qr' }, trustedSvg(setup.qr_svg)),
      h('p', { class: 'mono', id: 'totp-secret' }, setup.secret), h('label', {}, t('acct.totp_code'), code), e2,
      h('div', { class: 'actions' }, h('button', { type: 'button', id: 'totp-confirm', onclick: async () => {
        try {
          await api('POST', '/api/v1/console/totp/enable', { code: code.value.trim() });
          toast(t('acct.totp_enabled'));
          drawTotp(true);
        } catch (x) { e2.textContent = x.message; }
      } }, t('acct.totp_confirm'))));
    code.focus();
  }
  async function stopTotp() {
    const done = await dialog({ title: t('acct.totp_stop'), danger: true, ok: t('acct.totp_stop'), fields: [
      { name: 'password', label: t('acct.current'), type: 'password', required: true, autocomplete: 'current-password' },
      { name: 'code', label: t('acct.totp_code'), required: true, inputmode: 'numeric', maxlength: 6 }],
    submit: (v) => api('POST', '/api/v1/console/totp/disable', v) });
    if (done) { toast(t('acct.totp_disabled')); drawTotp(false); }
  }
  drawTotp(me.totp_enabled);

  clear(root, heading(t('acct.title')),
    h('div', { class: 'cols' },
      h('section', { class: 'card' }, h('h2', {}, t('acct.title')), h('dl', { class: 'facts' },
        h('dt', {}, t('acct.name')), h('dd', { id: 'acct-name' }, me.operator_id + (me.display_name ? ` (${me.display_name})` : '')),
        h('dt', {}, t('acct.role')), h('dd', {}, t(`role.${me.role}`)))),
      h('section', { class: 'card' }, h('h2', {}, t('acct.password')), password),
      h('section', { class: 'card' }, h('h2', {}, t('acct.totp')), totpBox),
      h('section', { class: 'card' }, h('h2', {}, t('acct.everywhere')), h('p', {}, t('acct.everywhere_text')),
        h('div', { class: 'actions' }, h('button', { type: 'button', class: 'danger', id: 'everywhere', onclick: async () => {
          const r = await act(() => api('POST', '/api/v1/console/logout-everywhere'));
          if (r) { toast(t('acct.everywhere_done', { n: r.sessions_ended })); state.onSignedOut?.({}); }
        } }, t('acct.everywhere'))))));
}
