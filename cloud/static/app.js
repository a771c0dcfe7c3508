/* Tapshare phone pages: a small single-page app over the cloud's JSON API (/api/v1). No framework, no
   build step. Simplified Chinese first, English by the switch at the top. */
"use strict";

const T = {
  zh: {
    nav_home: "取水", nav_wallet: "钱包", nav_bills: "账单", nav_points: "积分", nav_account: "我的", lang: "EN",
    lang_label: "Switch to English", running_bar: "正在取水", running_view: "查看", running_where: "饮水机 {m}",
    running_open: "您在饮水机 {m} 有一次正在进行的取水。", view_session: "查看取水",
    held_note: "冻结 ¥{amt}：为正在进行的取水预留。结束后只按实际水量扣费，其余自动解冻。",
    step_login: "登录", step_register: "实名", step_topup: "充值", step_pour: "取水", steps_label: "开始取水的步骤",
    why_offline: "饮水机离线，暂时无法取水。", why_busy: "饮水机正在为他人服务，请稍候。",
    why_maintenance: "饮水机正在维护，暂时无法取水。", why_out_of_service: "饮水机暂停服务，暂时无法取水。",
    why_updating: "饮水机正在更新软件，约一分钟后恢复。",
    why_low_balance: "余额不足，请先充值。", continue_at: "回到饮水机 {m} 继续取水",
    agree_terms_pre: "我已阅读并同意", terms: "《用户协议》", privacy: "《隐私政策》", and: "和",
    must_agree: "请先阅读并勾选同意《用户协议》和《隐私政策》。",
    terms_title: "用户协议", privacy_title: "隐私政策", operator: "运营方", contact: "联系方式",
    operator_unset: "（开发模式：运营方未配置）",
    terms_body: [
      "本服务由{op}提供：您在饮水机上扫码、登录并完成实名登记后，可以用账户余额按升购买饮用水。",
      "<b>计费：</b>按饮水机屏幕显示的单价和实际计量的水量计费，精确到分；设备未确认开始的取水不收费。",
      "<b>余额：</b>充值以支付平台的到账通知为准；注销账户时，剩余余额原路退回，不会作废。",
      "<b>联系：</b>{contact}。"],
    privacy_body: [
      "个人信息处理者：{op}（{contact}）。",
      "我们处理您的手机号（登录）、实名信息（法规要求的实名制取水，单独征得同意）和取水记录（计费与账单）。",
      "证件号码与照片加密保存，照片在审核后删除；我们不出售您的个人信息，也不用于广告。",
      "您可以在「我的」中查看信息、撤回同意或注销账户。"],
    consent_handler: "个人信息处理者：{op}；联系方式：{contact}。",
    after_submit: "提交后：", pending_next: "审核通过后即可充值取水，结果会显示在首页和「我的」中。",
    gift_confirm: "用 {pts} 积分兑换「{name}」？兑换后积分不退还。", confirm_redeem: "确认兑换", cancel: "取消",
    redeemed: "兑换成功", pickup_how: "请凭取货码向运营方工作人员领取礼品。如有疑问请联系：{contact}。",
    order_no: "订单号", kind_payout: "余额退回",
    delete_explain: "注销后将删除您的姓名、证件信息和手机号，且无法恢复；交易记录依法保留。",
    delete_refund: "您的余额 ¥{amt} 将原路退回到充值时使用的支付账户，不会作废。如有疑问请联系：{contact}。",
    delete_go: "注销账户", delete_go_refund: "注销并退回余额 ¥{amt}",
    deleted_refund: "账户已注销。余额 ¥{amt} 正在原路退回到充值时使用的支付账户，通常几分钟到 3 个工作日到账。",
    deleted_manual: "其中 ¥{amt} 无法原路退回，将由运营方转账退回（编号 {id}）。",
    status: "状态", back_prev: "返回", withdraw_consent: "撤回个人敏感信息处理同意", points_redeem: "兑换礼品", name_short: "姓名",
    withdraw_confirm: "确定撤回？将删除证件信息并取消实名，需重新登记才能取水",
    dev_banner: "开发模式：短信不会真正发送（验证码显示在登录页）；支付为沙箱，不扣真实款项。",
    dev_sms_only: "开发模式：短信不会真正发送（验证码显示在登录页）。", dev_pay_only: "开发模式：可选沙箱支付，不扣真实款项。",
    scan_first: "请用手机扫描饮水机屏幕上的二维码。", machine: "饮水机", price: "单价", per_l: "元/升",
    water_temp: "水温", tds: "水质 TDS", online: "在线", offline: "离线", busy: "正在为他人服务",
    ready: "可以取水", maintenance: "维护中", out_of_service: "暂停服务", updating: "更新中", step: "下一步", login_first: "用手机号登录", register_first: "实名登记",
    review_pending: "实名登记审核中", rejected: "实名登记未通过", arrears_msg: "您的账户欠费，请先充值后再取水。",
    arrears: "欠费", topup: "充值", start: "开始取水", balance: "余额", available: "可用", held: "冻结",
    scan_again: "请重新扫描饮水机上的二维码。", confirm_price: "价格已变更，请确认新价格后再开始。",
    phone: "手机号", send_code: "获取验证码", resend_in: "秒后可重发", code: "验证码", login: "登录",
    dev_sms: "开发用短信收件箱（不是真实短信）", no_sms: "还没有短信", logged_in: "已登录",
    consent_title: "个人敏感信息处理同意书", consent_agree: "我已阅读并同意", consent_decline: "不同意",
    consent_body: [
      "为落实实名制取水要求，我们需要处理您的<b>身份证件号码</b>和<b>证件照片</b>。根据《个人信息保护法》，这些属于敏感个人信息，我们在收集前单独征得您的同意。",
      "<b>目的：</b>核验您的真实身份，仅用于实名登记。",
      "<b>方式：</b>证件号码与照片加密保存，密钥与数据库分开保管；照片不公开访问，仅具有审核权限的工作人员可查看，每次查看均记录在案；证件号码在任何展示和日志中都做脱敏处理。",
      "<b>保存期限：</b>照片在审核完成后 {days} 天内删除；您可随时注销账户，注销后我们删除您的姓名、证件信息与手机号，依法保留的交易记录除外。",
      "<b>不同意的后果：</b>您将无法完成实名登记，也无法取水；不影响浏览价格和水质。"],
    reg_title: "实名登记", legal_name: "姓名（与证件一致）", doc_type: "证件类型", doc_number: "证件号码",
    doc_resident_id: "居民身份证", doc_passport: "护照", doc_hk_macau_permit: "港澳居民来往内地通行证",
    doc_taiwan_permit: "台湾居民来往大陆通行证", manual_note: "该证件类型需人工审核。",
    photo: "证件照片（JPEG 或 PNG，不超过 5 MB）", submit: "提交", id_bad: "身份证号码校验未通过，请核对。",
    verified: "已实名认证", wallet: "钱包", topup_amount: "充值金额", paying: "正在确认付款……",
    paid: "充值成功", order_closed: "订单已关闭，未扣款。",
    order_disputed: "支付平台告知的金额与订单不符，运营方正在核对，请勿重复付款。核对后会到账或原路退回。", return_note: "返回本页不代表已付款：以支付平台的通知为准。",
    history: "明细", kind_topup: "充值", kind_charge: "消费", kind_refund: "退款", kind_adjustment: "调整",
    kind_withdrawal: "退回原支付账户", kind_refund_return: "退款未成功，已退回余额",
    pay_with: "支付方式", m_wechatpay: "微信支付", m_alipay: "支付宝", m_sandbox: "沙箱支付", m_dev: "开发用，不扣款", app_wechatpay: "微信", app_alipay: "支付宝",
    scan_to_pay: "请用{app}扫描二维码付款", qr_expires: "二维码 15 分钟内有效。",
    pay_cancelled: "已取消付款，未扣款。", payer_refused: "需要微信授权才能在微信内付款；也可以选择其他支付方式。",
    withdraw_title: "退回余额", withdraw_explain: "可将余额原路退回到充值时使用的微信或支付宝账户，通常几分钟到 3 个工作日到账。",
    withdraw_go: "原路退回 ¥{amt}", withdraw_confirm: "确认退回 ¥{amt}？", withdraw_none: "当前没有可退回的余额。",
    withdraw_done: "已申请退回 ¥{amt}。", withdraw_kept: "¥{amt} 无法原路退回（来自赠送或超过退款期限），如需退回请联系运营方。",
    refunds: "退款记录", rs_requested: "已提交", rs_processing: "退款中", rs_success: "已到账", rs_closed: "未成功，已退回余额",
    rs_failed: "未成功，已退回余额", rs_abnormal: "退款异常，运营方将联系您处理",
    session: "取水中", waiting_valve: "正在等待饮水机开阀……", volume: "水量", cost: "金额",
    remaining: "剩余额度", flow: "流速", press_stop: "取水完毕请按饮水机上的【停止】按钮。",
    stop_phone: "在手机上停止", stopping: "已发送停止指令……",
    voided: "饮水机未确认开始：目前未扣任何费用。如果仍有出水，只按实际计量的水量计费。", ended: "取水结束", bill: "账单", bills: "历史账单",
    no_bills: "还没有账单", time: "时间", duration: "时长", avg_flow: "平均流速", amount: "金额",
    quality: "水质", points_earned: "获得积分", refunded: "已退款", location: "地点", end_reason: "结束原因",
    points: "积分", rule: "规则", gifts: "礼品", redeem: "兑换", redemptions: "兑换记录", pickup: "取货码",
    no_gifts: "暂无礼品", account: "我的账户", logout: "退出登录", delete_account: "注销账户",
    deleted: "账户已注销。",
    not_logged_in: "请先登录。", litre: "升", yuan: "元", min: "分钟", s: "秒", back: "返回首页",
    points_unit: "积分", stock: "库存", reason_stop_button: "按下停止按钮", reason_phone_stop: "手机停止",
    reason_credit_exhausted: "额度用完", reason_max_volume: "达到单次上限", reason_idle: "长时间无水流",
    reason_max_duration: "达到最长时间", reason_cancelled: "手机或远程停止", reason_fault: "设备故障",
    reason_leak: "检测到漏水", reason_shutdown: "设备关机", reason_power_loss: "断电", ml_per_min: "毫升/分钟", registration: "实名状态",
    state_none: "未登记", state_pending: "审核中", state_verified: "已认证", state_rejected: "未通过",
  },
  en: {
    nav_home: "Water", nav_wallet: "Wallet", nav_bills: "Bills", nav_points: "Points", nav_account: "Me", lang: "中文",
    lang_label: "切换到中文", running_bar: "Pouring now", running_view: "View", running_where: "dispenser {m}",
    running_open: "You have a pour running at dispenser {m}.", view_session: "View the pour",
    held_note: "¥{amt} held for the pour that is running. When it ends you pay only for the water measured; the rest is released.",
    step_login: "Log in", step_register: "Verify ID", step_topup: "Top up", step_pour: "Pour", steps_label: "Steps to your first pour",
    why_offline: "The dispenser is offline: it cannot pour right now.", why_busy: "The dispenser is serving someone else: please wait.",
    why_maintenance: "The dispenser is being serviced: it cannot pour right now.",
    why_updating: "The dispenser is installing a software update: back in about a minute.",
    why_out_of_service: "The dispenser is out of service: it cannot pour right now.",
    why_low_balance: "Your balance is too low: top up first.", continue_at: "Back to dispenser {m} to pour",
    agree_terms_pre: "I have read and agree to the", terms: "User Agreement", privacy: "Privacy Policy", and: "and the",
    must_agree: "Please read and tick your agreement to the User Agreement and the Privacy Policy first.",
    terms_title: "User Agreement", privacy_title: "Privacy Policy", operator: "Operator", contact: "Contact",
    operator_unset: "(development mode: no operator configured)",
    terms_body: [
      "This service is provided by {op}: after you scan a dispenser's code, log in and register your real name, you buy drinking water by the litre from your balance.",
      "<b>Billing:</b> at the price the dispenser shows, for the water it measured, to the fen; a pour the dispenser never confirmed costs nothing.",
      "<b>Balance:</b> a top-up counts when the payment provider confirms it; when you delete your account, the balance is paid back to where it came from, never forfeited.",
      "<b>Contact:</b> {contact}."],
    privacy_body: [
      "Personal information handler: {op} ({contact}).",
      "We process your mobile number (login), your real-name details (the law requires real-name water sales; asked for with separate consent) and your pours (billing and bills).",
      "Document numbers and photos are stored encrypted and photos are deleted after review; we never sell your information or use it for advertising.",
      "Under Me you can see your information, withdraw consent or delete your account."],
    consent_handler: "Handler of your personal information: {op}; contact: {contact}.",
    after_submit: "After you submit:", pending_next: "Once approved you can top up and pour; the result shows on the home page and under Me.",
    gift_confirm: "Redeem {pts} points for \u201c{name}\u201d? Points are not returned after redeeming.", confirm_redeem: "Redeem", cancel: "Cancel",
    redeemed: "Redeemed", pickup_how: "Show the pickup code to the operator's staff to collect the gift. Questions: {contact}.",
    order_no: "Order number", kind_payout: "Balance paid back",
    delete_explain: "Deleting erases your name, document and mobile number and cannot be undone; transaction records the law requires are kept.",
    delete_refund: "Your balance of ¥{amt} is paid back to the payment account you topped up with, never forfeited. Questions: {contact}.",
    delete_go: "Delete my account", delete_go_refund: "Delete and pay back ¥{amt}",
    deleted_refund: "Your account is deleted. The balance of ¥{amt} is on its way back to the payment account you topped up with (minutes to 3 working days).",
    deleted_manual: "¥{amt} of it cannot go back to a payment: the operator pays it by transfer (reference {id}).",
    status: "Status", back_prev: "Back", withdraw_consent: "Withdraw my consent to ID processing", points_redeem: "Gift redeemed", name_short: "Name",
    withdraw_confirm: "Withdraw? Your ID data is erased and you must register again to buy water",
    dev_banner: "Development mode: no real SMS is sent (the code shows on the login page); payments are a sandbox and move no money.",
    dev_sms_only: "Development mode: no real SMS is sent (the code shows on the login page).",
    dev_pay_only: "Development mode: the sandbox payment is offered; it moves no money.",
    scan_first: "Scan the QR code on a dispenser's screen with your phone.", machine: "Dispenser", price: "Price",
    per_l: "yuan/L", water_temp: "Water temperature", tds: "Water quality (TDS)", online: "Online",
    offline: "Offline", busy: "Serving someone else", ready: "Ready", maintenance: "Under maintenance", updating: "Updating",
    out_of_service: "Out of service", step: "Next step",
    login_first: "Log in with your phone number", register_first: "Register your real name",
    review_pending: "Your registration is being reviewed", rejected: "Your registration was not accepted",
    arrears_msg: "Your account is in arrears: top up before you take water.", arrears: "Arrears", topup: "Top up",
    start: "Start", balance: "Balance", available: "Available", held: "Held",
    scan_again: "Please scan the QR code on the dispenser again.",
    confirm_price: "The price has changed: confirm the new price to start.", phone: "Mobile number",
    send_code: "Send code", resend_in: "s until resend", code: "Code", login: "Log in",
    dev_sms: "Development SMS inbox (not a real SMS)", no_sms: "No messages yet", logged_in: "Logged in",
    consent_title: "Consent to process sensitive personal information", consent_agree: "I have read this and agree",
    consent_decline: "I do not agree",
    consent_body: [
      "Real-name water sales require us to process your <b>ID document number</b> and a <b>photo of the document</b>. Under China's Personal Information Protection Law these are sensitive personal information, so we ask for your separate consent before we collect them.",
      "<b>Purpose:</b> to verify your identity for registration only.",
      "<b>How:</b> the number and photo are stored encrypted with a key kept apart from the database; the photo is never publicly reachable, only staff with the reviewer role can view it, and every view is logged; the number is masked wherever it is shown or logged.",
      "<b>How long:</b> the photo is deleted {days} days after review; you can delete your account at any time, which erases your name, document and phone number (transaction records the law requires are kept).",
      "<b>If you do not agree:</b> you cannot register or buy water; you can still see prices and water quality."],
    reg_title: "Real-name registration", legal_name: "Legal name (as on the document)", doc_type: "Document type",
    doc_number: "Document number", doc_resident_id: "Resident identity card", doc_passport: "Passport",
    doc_hk_macau_permit: "Hong Kong/Macau permit", doc_taiwan_permit: "Taiwan permit",
    manual_note: "This document type is reviewed by a person.",
    photo: "Photo of the document (JPEG or PNG, at most 5 MB)", submit: "Submit",
    id_bad: "This resident ID number fails its check: please check it.", verified: "Verified",
    wallet: "Wallet", topup_amount: "Amount", paying: "Confirming the payment…", paid: "Top-up received",
    order_closed: "The order closed; nothing was charged.",
    order_disputed: "The payment provider reported an amount that does not match the order. The operator is checking it: please do not pay again; it will be credited or refunded.",
    return_note: "Coming back here does not mean you paid: the payment provider's notification decides.",
    history: "History", kind_topup: "Top-up", kind_charge: "Water", kind_refund: "Refund", kind_adjustment: "Adjustment",
    kind_withdrawal: "Back to your payment account", kind_refund_return: "Refund failed: back in your balance",
    pay_with: "Pay with", m_wechatpay: "WeChat Pay", m_alipay: "Alipay", m_sandbox: "Sandbox", m_dev: "development: no money", app_wechatpay: "WeChat", app_alipay: "Alipay",
    scan_to_pay: "Scan the QR code with {app} to pay", qr_expires: "The QR code is valid for 15 minutes.",
    pay_cancelled: "Payment cancelled; nothing was charged.",
    payer_refused: "Paying inside WeChat needs WeChat's authorisation; or choose another way to pay.",
    withdraw_title: "Take your balance back",
    withdraw_explain: "Your balance can go back to the WeChat or Alipay account you topped up with; it usually arrives within minutes to 3 working days.",
    withdraw_go: "Refund ¥{amt} to my payment account", withdraw_confirm: "Refund ¥{amt}? Tap again to confirm",
    withdraw_none: "There is no balance that can go back now.", withdraw_done: "Refund of ¥{amt} requested.",
    withdraw_kept: "¥{amt} cannot go back to a payment (a credit, or past the refund period): ask the operator.",
    refunds: "Refunds", rs_requested: "Requested", rs_processing: "In progress", rs_success: "Received",
    rs_closed: "Failed: back in your balance", rs_failed: "Failed: back in your balance",
    rs_abnormal: "Could not be paid to your account: the operator will contact you",
    session: "Dispensing", waiting_valve: "Waiting for the dispenser to open the valve…", volume: "Volume",
    cost: "Cost", remaining: "Credit left", flow: "Flow", press_stop: "When you are done, press the STOP button on the dispenser.",
    stop_phone: "Stop from the phone", stopping: "Stop sent…",
    voided: "The dispenser did not confirm the start: nothing has been charged. If it poured anyway, you pay only for the water it measured.", ended: "Finished", bill: "Bill",
    bills: "Past bills", no_bills: "No bills yet", time: "Time", duration: "Duration", avg_flow: "Average flow",
    amount: "Amount", quality: "Water quality", points_earned: "Points earned", refunded: "Refunded",
    location: "Location", end_reason: "Ended by", points: "Points", rule: "Rule", gifts: "Gifts", redeem: "Redeem",
    redemptions: "Redemptions", pickup: "Pickup code", no_gifts: "No gifts yet", account: "My account",
    logout: "Log out", delete_account: "Delete my account",
    deleted: "Your account is deleted.",
    not_logged_in: "Please log in first.", litre: "L", yuan: "yuan", min: "min", s: "s", back: "Home",
    points_unit: "pts", stock: "In stock", reason_stop_button: "Stop button", reason_phone_stop: "Phone stop",
    reason_credit_exhausted: "Credit used up", reason_max_volume: "Volume limit", reason_idle: "No flow",
    reason_max_duration: "Time limit", reason_cancelled: "Stopped from the phone or remotely",
    reason_fault: "Machine fault", reason_leak: "Leak detected", reason_shutdown: "Machine shut down",
    reason_power_loss: "Power loss", ml_per_min: "ml/min", registration: "Registration",
    state_none: "Not registered", state_pending: "Under review", state_verified: "Verified", state_rejected: "Rejected",
  },
};
const ERR_ZH = {
  payment_unavailable: "支付平台暂时无法创建订单，未扣款。请稍后再试或换一种支付方式。",
  nothing_to_withdraw: "当前没有可退回的余额。", not_refundable: "这部分余额无法原路退回（来自赠送或超过退款期限），请联系运营方。",
  sms_unavailable: "短信暂时发送失败，请一分钟后再试。", phone_rejected: "短信平台无法向该号码发送，请核对手机号。",
  pay_cancelled: "已取消付款，未扣款。", payer_refused: "需要微信授权才能在微信内付款；也可以选择其他支付方式。",
  link_expired: "授权已过期，请重新充值。", too_many_withdrawals: "今天退回次数已达上限，请明天一次性退回。",
  bad_phone: "手机号格式不正确（11 位，以 13-19 开头）。", sms_too_soon: "验证码发送太频繁，请稍后再试。",
  sms_limit_phone: "该号码今天获取验证码次数过多，请稍后再试。", sms_limit_ip: "当前网络请求验证码过多，请稍后再试。",
  wrong_code: "验证码错误。", code_expired: "验证码已过期，请重新获取。", too_many_attempts: "错误次数过多，请重新获取验证码。",
  no_code: "请先获取验证码。", code_used: "验证码已使用，请重新获取。", bad_name: "姓名格式不正确。",
  bad_id_number: "证件号码不正确。", not_an_image: "请上传 JPEG 或 PNG 格式的照片。", photo_too_large: "照片超过 5 MB。",
  photo_too_small: "照片太小，证件内容看不清。", photo_too_many_pixels: "照片像素过多。", body_too_large: "文件过大。",
  document_in_use: "该证件已登记在其他账户。", consent_required: "请先同意个人敏感信息处理。",
  not_registered: "请先完成实名登记。", arrears: "账户欠费，请先充值。", insufficient_balance: "余额不足，请充值。",
  machine_busy: "饮水机正在为他人服务，请稍候。", machine_offline: "饮水机离线，未扣费。", session_open: "您有正在进行的取水。",
  scan_again: "请重新扫描饮水机上的二维码。", qr_expired: "二维码已过期，请重新扫描。", price_changed: "价格已变更。",
  insufficient_points: "积分不足。", out_of_stock: "礼品已兑完。", bad_amount: "充值金额需在 1 至 500 元之间。",
  unauthenticated: "登录已过期，请重新登录。", unknown_machine: "找不到这台饮水机。", balance_remaining: "账户还有余额。",
  machine_out_of_service: "饮水机暂停服务，未扣费。", machine_maintenance: "饮水机正在维护，未扣费。",
  machine_updating: "饮水机正在更新软件，未扣费，请约一分钟后再试。",
  too_many_scans: "扫码过于频繁，请稍后再试。", upload_quota: "上传次数过多，请一小时后再试。",
  too_many_orders: "未完成的充值订单过多，请先完成或稍后再试。", busy: "服务器繁忙，请稍后再试。",
  network: "网络连接失败，请检查网络后重试。", nul_character: "输入包含无效字符。",
  session_over: "本次取水已经结束。", unknown_gift: "该礼品已下架。", consent_outdated: "同意书已更新，请重新阅读并同意。",
  already_submitted: "您的实名登记已提交，请勿重复提交。", bad_photo: "请先上传证件照片。", no_photo: "找不到证件照片，请重新上传。",
  database_busy: "服务器繁忙，本次操作未生效，请重试。", database_unavailable: "服务器暂时无法访问数据，请稍后重试。",
  internal: "服务器出错（已记录），请重试。",
  retry: "服务器繁忙，请重试。", topup_pending: "还有一笔充值正在支付，请在支付完成或关闭后（最多 15 分钟）再注销。",
};

const $ = (sel) => document.querySelector(sel);
const view = () => $("#view");
let lang = localStorage.getItem("tapshare.lang") || "zh";
let timers = [];
const t = (k, vars) => {
  let s = (T[lang][k] ?? T.zh[k] ?? k);
  if (vars && typeof s === "string") for (const [a, b] of Object.entries(vars)) s = s.replaceAll(`{${a}}`, () => String(b));
  return s;
};
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const yuan = (fen) => (fen / 100).toFixed(2);
const token = () => localStorage.getItem("tapshare.token");
const visit = () => { try { return JSON.parse(sessionStorage.getItem("tapshare.visit") || "null"); } catch { return null; } };
let devMode = false;
// say exactly which development providers are on: the SMS sink, the sandbox payment, or both
const devBannerKey = () => clientConfig.development_sms_sink && clientConfig.sandbox_payments ? "dev_banner"
  : clientConfig.development_sms_sink ? "dev_sms_only" : "dev_pay_only";
let clientConfig = {};

class ApiError extends Error {
  constructor(status, body) { super(body.message || `HTTP ${status}`); this.status = status; this.code = body.error; this.body = body; }
}
const ERR_EN = {
  payment_unavailable: "The payment provider could not start the payment; nothing was charged. Try again or choose another way to pay.",
  nothing_to_withdraw: "There is no balance to take back.",
  not_refundable: "This balance cannot go back to a payment (a credit, or past the refund period): ask the operator.",
  sms_unavailable: "The SMS could not be sent just now: try again in a minute.",
  phone_rejected: "The SMS provider cannot send to this number: please check it.",
  link_expired: "The authorisation expired: start the top-up again.",
  too_many_withdrawals: "That is today's last withdrawal: take the rest back tomorrow, all at once.",
  session_open: "You have a pour running.", balance_remaining: "Your account still has a balance.",
  topup_pending: "A top-up is still being paid: delete the account once it is paid or closed (at most 15 minutes).",
  network: "Network error: check your connection and try again.", machine_offline: "The dispenser is offline: nothing was charged.",
  machine_updating: "The dispenser is installing a software update: nothing was charged. Try again in about a minute.",
};
function errText(e) {
  if (lang === "zh" && e.code && ERR_ZH[e.code]) return ERR_ZH[e.code];
  if (lang === "en" && e.code && ERR_EN[e.code]) return ERR_EN[e.code];
  return e.message || String(e);
}
async function api(method, path, body, extra = {}) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let payload = body;
  if (body !== undefined && !(body instanceof Blob)) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  if (body instanceof Blob) headers["Content-Type"] = body.type || "application/octet-stream";
  let r;
  try {
    r = await fetch(path, {method, headers, body: payload, ...extra});
  } catch {
    // never "Failed to fetch": say it in words
    throw new ApiError(0, {error: "network", message: "Network error: check your connection and try again."});
  }
  const data = await r.json().catch(() => ({error: "bad_response", message: `HTTP ${r.status}`}));
  if (!r.ok) {
    if (r.status === 401 && data.error === "unauthenticated") localStorage.removeItem("tapshare.token");
    throw new ApiError(r.status, data);
  }
  return data;
}

function render(html) { view().innerHTML = html; }
function showError(where, e) {
  const el = typeof where === "string" ? $(where) : where;
  if (!el) return;
  const text = errText(e);
  if (el.textContent === text) return;           // a repeated failure is not re-announced or re-scrolled
  el.textContent = text;
  el.scrollIntoView({block: "nearest"});         // next to the action, and on screen
}
function clearTimers() { timers.forEach(clearInterval); timers = []; }
// Each route() starts a new page; an older page's async work that finishes late must not write into it.
let routeSeq = 0;
const pageToken = () => routeSeq;
const stale = (token) => token !== routeSeq;
function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function announce(text) { const a = $("#announce"); if (a && a.textContent !== text) a.textContent = text; }
const operatorName = () => clientConfig.operator_name || t("operator_unset");
const operatorContact = () => clientConfig.operator_contact || "—";

function applyChrome(tab) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
  $("#lang").textContent = t("lang");
  $("#lang").setAttribute("aria-label", t("lang_label"));
  $("#lang").lang = lang === "zh" ? "en" : "zh-CN";
  document.querySelectorAll(".tabs a").forEach((a) => {
    if (a.dataset.tab === tab) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  const bar = $("#devbar");
  bar.hidden = !devMode; bar.textContent = t(devBannerKey());
}

// Any page shows the pour that is running, with a way back to it (a person who left the page mid-pour).
async function showRunning(me, onSessionPage) {
  const bar = $("#running");
  const r = me && me.running_session;
  if (!r || onSessionPage) { bar.hidden = true; return; }
  bar.hidden = false;
  bar.innerHTML = `<span class="dot" aria-hidden="true"></span><span class="what">${t("running_bar")} · ${esc(t("running_where", {m: r.machine_id}))}</span>
    <a href="#/session/${esc(r.session_id)}" id="running-view">${t("running_view")}</a>`;
}
async function refreshRunning(onSessionPage) {
  if (!token()) { $("#running").hidden = true; return null; }
  const my = pageToken();
  try { const me = await api("GET", "/api/v1/me"); if (!stale(my)) showRunning(me, onSessionPage); return me; }
  catch { return null; }
}

// ---------------------------------------------------------------- the QR link: /m/<machine>?c=<code>
async function scanFromUrl() {
  const m = location.pathname.match(/^\/m\/([A-Za-z0-9_-]+)$/);
  const code = new URLSearchParams(location.search).get("c");
  if (!m || !code) return null;
  try {
    const r = await api("GET", `/api/v1/scan?machine=${encodeURIComponent(m[1])}&c=${encodeURIComponent(code)}`);
    sessionStorage.setItem("tapshare.visit", JSON.stringify({presence_token: r.presence_token, machine: r.machine,
                                                             at: Date.now()}));
    history.replaceState(null, "", `/m/${m[1]}${location.hash}`);     // a reload must not reuse the code
    return null;
  } catch (e) { return e; }
}

function machineState(m) {
  if (!m.online) return ["bad", "offline", "why_offline"];
  if (m.state === "maintenance") return ["amber", "maintenance", "why_maintenance"];
  if (m.state === "out_of_service") return ["bad", "out_of_service", "why_out_of_service"];
  if (m.state === "updating") return ["amber", "updating", "why_updating"];
  if (m.busy) return ["amber", "busy", "why_busy"];
  return ["ok", "ready", null];
}
function machineCard(m) {
  const [cls, word] = machineState(m);
  return `<section class="card" id="machine"><h2>${t("machine")} ${esc(m.machine_id)}</h2>
    <p class="muted addr">${esc(m.location)}</p>
    <div class="grid">
      <div class="stat"><span>${t("price")}</span><b id="price">${yuan(m.price_fen_per_l)} <span class="unit">${t("per_l")}</span></b></div>
      <div class="stat"><span>${t("water_temp")}</span><b id="temp">${m.temp_c == null ? "—" : m.temp_c.toFixed(1) + " °C"}</b></div>
      <div class="stat"><span>${t("tds")}</span><b id="tds">${m.tds_ppm == null ? "—" : m.tds_ppm + " ppm"}</b></div>
      <div class="stat"><span>${t("status")}</span><b id="mstate" class="${cls}">${t(word)}</b></div>
    </div></section>`;
}
function stepper(done) {
  const steps = ["login", "register", "topup", "pour"];
  return `<ol class="stepper" aria-label="${t("steps_label")}">${steps.map((k, i) => {
    const st = i < done ? "done" : i === done ? "now" : "todo";
    return `<li class="${st}" ${st === "now" ? 'aria-current="step"' : ""}><span class="n">${st === "done" ? "✓" : i + 1}</span><span class="l">${t("step_" + k)}</span></li>`;
  }).join("")}</ol>`;
}

async function home(scanError) {
  const v = visit();
  let html = "";
  if (scanError) html += `<div class="card err" id="scan-error" role="alert">${esc(errText(scanError))}</div>`;
  html += v ? machineCard(v.machine) : `<section class="card"><p>${t("scan_first")}</p></section>`;
  html += `<section class="card" id="next"><h2>${t("step")}</h2><div id="stepper"></div><div id="next-body"></div></section>`;
  render(html);
  const body = $("#next-body");
  if (!token()) {
    $("#stepper").innerHTML = stepper(0);
    body.innerHTML = `<a class="button" id="go-login" href="#/login">${t("login_first")}</a>`;
    return;
  }
  let me;
  const my = pageToken();
  try { me = await api("GET", "/api/v1/me"); } catch (e) {
    if (stale(my)) return;
    body.innerHTML = `<p class="err" id="start-error" role="alert"></p>`; showError("#start-error", e); if (!token()) home(); return;
  }
  if (stale(my)) return;
  showRunning(me, false);
  if (me.running_session) {                       // a pour is running: that comes first, whatever was scanned
    const r = me.running_session;
    body.innerHTML = `<p id="running-note">${esc(t("running_open", {m: r.machine_id}))}</p>
      ${me.held_fen > 0 ? `<p class="note" id="held-note">${esc(t("held_note", {amt: yuan(me.held_fen)}))}</p>` : ""}
      <a class="button" id="go-session" href="#/session/${esc(r.session_id)}">${t("view_session")}</a>`;
    return;
  }
  if (!me.registered) {
    $("#stepper").innerHTML = stepper(1);
    const st = me.identity_state;
    if (st === "pending") {
      const idv = await api("GET", "/api/v1/me/identity");
      if (stale(my)) return;
      body.innerHTML = `<p class="amber" id="review-pending">${t("review_pending")}</p><p class="muted">${esc(idv.review_hint[lang])}</p>
        <p class="muted">${t("pending_next")}</p>`;
    } else {
      body.innerHTML = (st === "rejected" ? `<p class="bad">${t("rejected")}</p>` : "") +
        `<a class="button" id="go-register" href="#/consent">${t("register_first")}</a>`;
    }
    return;
  }
  if (!me.bills.length) $("#stepper").innerHTML = stepper(me.available_fen <= 0 ? 2 : 3);
  const bal = `<p>${t("balance")}: <b id="balance">¥${yuan(me.available_fen)}</b></p>`;
  if (me.arrears_fen > 0) {
    body.innerHTML = `<p class="bad" id="arrears">${t("arrears_msg")} ${t("arrears")}: ¥${yuan(me.arrears_fen)}</p>
      <a class="button" href="#/wallet">${t("topup")}</a>`;
    return;
  }
  if (!v) { body.innerHTML = bal + `<p class="muted">${t("scan_first")}</p><a class="button secondary" href="#/wallet">${t("topup")}</a>`; return; }
  body.innerHTML = bal + `<p class="err" id="start-error" role="alert"></p><p class="muted" id="start-why"></p>
    <button id="start">${t("start")} · ${yuan(v.machine.price_fen_per_l)} ${t("per_l")}</button>
    <a class="button secondary" id="go-topup" href="#/wallet">${t("topup")}</a>`;
  let holdUntil = 0;                    // a price that just changed is shown a moment before Start takes it
  const update = (m) => {               // the machine's state as of a second ago: Start says why it cannot work
    if (stale(my)) return;
    const lowBalance = me.available_fen < Math.max(1, Math.floor(m.price_fen_per_l / 50));
    const [cls, word, why] = machineState(m);
    const st = $("#mstate"); if (!st) return;
    st.className = cls; st.textContent = t(word);
    $("#price").innerHTML = `${yuan(m.price_fen_per_l)} <span class="unit">${esc(t("per_l"))}</span>`;
    $("#temp").textContent = m.temp_c == null ? "—" : m.temp_c.toFixed(1) + " °C";
    $("#tds").textContent = m.tds_ppm == null ? "—" : m.tds_ppm + " ppm";
    const reason = why ? t(why) : lowBalance ? t("why_low_balance") : "";
    $("#start-why").textContent = reason;
    $("#start").disabled = Boolean(reason) || $("#start").dataset.busy === "1" || Date.now() < holdUntil;
    $("#go-topup").className = lowBalance ? "button" : "button secondary";
  };
  update(v.machine);
  $("#start").onclick = () => startSession(v);
  let polling = false;
  every(1000, async () => {
    if (polling) return;                // one request at a time: an old answer never overwrites a newer one
    if (Date.now() - v.at > 5 * 60_000) { clearTimers(); return; }    // the visit is over: scan again to see it
    polling = true;
    try {
      const m = await api("GET", `/api/v1/machines/${encodeURIComponent(v.machine.machine_id)}`);
      if (stale(my)) return;
      if (m.busy && !v.machine.busy) {  // busy: perhaps with this person's own pour, started from another tab
        const me2 = await api("GET", "/api/v1/me");
        if (stale(my)) return;
        if (me2.running_session) {
          v.machine = {...v.machine, ...m};
          sessionStorage.setItem("tapshare.visit", JSON.stringify(v));
          route(); return;
        }
      }
      if (m.price_fen_per_l !== v.machine.price_fen_per_l && $("#start")) {
        $("#start").textContent = `${t("start")} · ${yuan(m.price_fen_per_l)} ${t("per_l")}`;
        $("#start-error").textContent = t("confirm_price");
        holdUntil = Date.now() + 1500;
        setTimeout(() => update(v.machine), 1600);
      }
      v.machine = {...v.machine, ...m};
      sessionStorage.setItem("tapshare.visit", JSON.stringify(v));
      update(v.machine);
    } catch { /* the next poll tries again; the start itself says what is wrong */ }
    finally { polling = false; }
  });
}

async function startSession(v) {
  const btn = $("#start"); btn.disabled = true; btn.dataset.busy = "1";
  $("#start-error").textContent = "";
  try {
    const r = await api("POST", "/api/v1/sessions", {presence_token: v.presence_token,
                                                     expected_price_fen_per_l: v.machine.price_fen_per_l});
    location.hash = `#/session/${r.session_id}`;
  } catch (e) {
    btn.dataset.busy = ""; btn.disabled = false;
    if (e.code === "price_changed") {
      v.machine.price_fen_per_l = e.body.price_fen_per_l;
      sessionStorage.setItem("tapshare.visit", JSON.stringify(v));
      $("#price").textContent = `${yuan(v.machine.price_fen_per_l)} ${t("per_l")}`;
      btn.textContent = `${t("start")} · ${yuan(v.machine.price_fen_per_l)} ${t("per_l")}`;
      $("#start-error").textContent = t("confirm_price");
      return;
    }
    if (e.code === "session_open" && e.body.session_id) {
      $("#start-error").innerHTML = `${esc(errText(e))} <a href="#/session/${esc(e.body.session_id)}" id="to-running">${t("view_session")}</a>`;
      return;
    }
    showError("#start-error", e);
  }
}

// ---------------------------------------------------------------- login, agreement and privacy policy
async function loginView() {
  render(`<section class="card"><h1>${t("login")}</h1>
    <label for="phone">${t("phone")}</label><input id="phone" type="tel" inputmode="numeric" autocomplete="tel" maxlength="16" placeholder="13800000000">
    <button id="send" class="secondary">${t("send_code")}</button>
    <label for="code">${t("code")}</label><input id="code" inputmode="numeric" autocomplete="one-time-code" maxlength="6">
    <div class="check"><input type="checkbox" id="agree-terms"><label for="agree-terms">${t("agree_terms_pre")}
      <a href="#/terms" id="terms-link" data-policy="terms">${t("terms")}</a>${lang === "en" ? " " + t("and") + " " : t("and")}<a href="#/privacy" id="privacy-link" data-policy="privacy">${t("privacy")}</a></label></div>
    <section class="policy-panel" id="policy-panel" hidden></section>
    <p class="err" id="login-error" role="alert"></p><button id="login">${t("login")}</button></section>
    <section class="card" id="sms-inbox" hidden><h2>${t("dev_sms")}</h2><div id="sms-list" class="muted"></div></section>`);
  document.querySelectorAll("a[data-policy]").forEach((a) => { a.onclick = (ev) => {
    ev.preventDefault();
    const panel = $("#policy-panel");
    panel.hidden = false;
    panel.innerHTML = policyHtml(a.dataset.policy) + `<button class="secondary" id="policy-back">${t("back_prev")}</button>`;
    $("#policy-back").onclick = () => { panel.hidden = true; panel.innerHTML = ""; a.focus(); };
    $("#policy-back").focus();
  }; });
  const agreed = () => {
    if ($("#agree-terms").checked) return true;
    $("#login-error").textContent = t("must_agree"); $("#agree-terms").focus(); return false;
  };
  let countdown = 0;
  $("#send").onclick = async () => {
    $("#login-error").textContent = "";
    if (!agreed()) return;
    try {
      const r = await api("POST", "/api/v1/auth/sms-code", {phone: $("#phone").value});
      countdown = r.resend_after_s;
      const tick = () => { countdown -= 1; $("#send").disabled = countdown > 0;
        $("#send").textContent = countdown > 0 ? `${countdown} ${t("resend_in")}` : t("send_code"); };
      $("#send").disabled = true; timers.push(setInterval(tick, 1000));
      if (r.development_sms_sink) showDevInbox($("#phone").value);
    } catch (e) { showError("#login-error", e); }
  };
  $("#login").onclick = async () => {
    $("#login-error").textContent = "";
    if (!agreed()) return;
    try {
      const r = await api("POST", "/api/v1/auth/login", {phone: $("#phone").value, code: $("#code").value});
      localStorage.setItem("tapshare.token", r.token);
      location.hash = "#/";
    } catch (e) { showError("#login-error", e); }
  };
}
async function showDevInbox(phone) {
  const box = $("#sms-inbox"); if (!box) return;
  try {
    const r = await api("GET", `/api/v1/dev/sms?phone=${encodeURIComponent(phone)}`);
    box.hidden = false;
    $("#sms-list").innerHTML = r.messages.length ? r.messages.map((m) => `<p class="sms">${esc(m.text)}</p>`).join("") : t("no_sms");
  } catch { /* not a development server */ }
}
function policyHtml(which) {
  const op = esc(operatorName()), contact = esc(operatorContact());
  return `<div class="policy" id="${which}"><h2>${t(which + "_title")}</h2>
    ${t(which + "_body").map((p) => `<p>${p.replaceAll("{op}", () => op).replaceAll("{contact}", () => contact)}</p>`).join("")}</div>`;
}
function policyView(which) {
  render(`<section class="card">${policyHtml(which)}<button class="secondary" id="policy-back">${t("back_prev")}</button></section>`);
  $("#policy-back").onclick = () => history.back();
}

// ---------------------------------------------------------------- consent and registration (s4)
async function consentView() {
  if (!token()) { location.hash = "#/login"; return; }
  const idv = await api("GET", "/api/v1/me/identity");
  if (idv.consent_given) { location.hash = "#/register"; return; }
  render(`<section class="card consent"><h1>${t("consent_title")}</h1>
    <p id="handler">${esc(t("consent_handler", {op: operatorName(), contact: operatorContact()}))}</p>
    ${t("consent_body").map((p) => `<p>${p.replace("{days}", String(idv.photo_retention_days))}</p>`).join("")}
    <p class="muted">v${esc(idv.consent_version)}</p><p class="err" id="consent-error" role="alert"></p>
    <button id="agree">${t("consent_agree")}</button><a class="button quiet" id="decline" href="#/">${t("consent_decline")}</a></section>`);
  $("#agree").onclick = async () => {
    try { await api("POST", "/api/v1/me/consent", {version: idv.consent_version, agree: true}); location.hash = "#/register"; }
    catch (e) { showError("#consent-error", e); }
  };
}

const WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
function residentIdOk(n) {       // the same GB 11643 check the server makes, to help before sending
  n = n.trim().toUpperCase();
  if (!/^\d{17}[\dX]$/.test(n)) return false;
  const sum = WEIGHTS.reduce((acc, w, i) => acc + w * Number(n[i]), 0);
  return "10X98765432"[sum % 11] === n[17];
}

async function registerView() {
  if (!token()) { location.hash = "#/login"; return; }
  const idv = await api("GET", "/api/v1/me/identity");
  if (!idv.consent_given) { location.hash = "#/consent"; return; }
  if (idv.state === "pending" || idv.state === "verified") { location.hash = "#/account"; return; }
  const docs = ["resident_id", "passport", "hk_macau_permit", "taiwan_permit"];
  render(`<section class="card"><h1>${t("reg_title")}</h1>
    ${idv.state === "rejected" ? `<p class="bad">${t("rejected")}: ${esc(idv.reject_reason)}</p>` : ""}
    <label for="name">${t("legal_name")}</label><input id="name" autocomplete="name" maxlength="40">
    <label for="doctype">${t("doc_type")}</label><select id="doctype">${docs.map((d) => `<option value="${d}">${t("doc_" + d)}</option>`).join("")}</select>
    <p class="muted" id="doc-note" hidden>${t("manual_note")}</p>
    <label for="docnum">${t("doc_number")}</label><input id="docnum" maxlength="20" autocomplete="off">
    <label for="photo">${t("photo")}</label><input id="photo" type="file" accept="image/jpeg,image/png">
    <p class="note">${t("after_submit")} ${esc(idv.review_hint[lang])}</p>
    <p class="err" id="reg-error" role="alert"></p><button id="submit">${t("submit")}</button></section>`);
  $("#doctype").onchange = () => { $("#doc-note").hidden = $("#doctype").value === "resident_id"; };
  $("#submit").onclick = async () => {
    $("#reg-error").textContent = "";
    const docType = $("#doctype").value, number = $("#docnum").value;
    if (docType === "resident_id" && !residentIdOk(number)) { showError("#reg-error", {message: t("id_bad")}); return; }
    const file = $("#photo").files[0];
    if (!file) { showError("#reg-error", {code: "not_an_image", message: "choose a photo"}); return; }
    $("#submit").disabled = true;
    try {
      const photo = await api("PUT", "/api/v1/me/id-photo", file);
      await api("POST", "/api/v1/me/registration", {legal_name: $("#name").value, doc_type: docType,
                                                     doc_number: number, photo_id: photo.photo_id});
      location.hash = "#/";
    } catch (e) { $("#submit").disabled = false; showError("#reg-error", e); }
  };
}

// ---------------------------------------------------------------- wallet (s5)
function entriesHtml(entries) {
  return entries.map((e) => `<li><span>${t("kind_" + e.kind)}<br><small class="muted">${esc(localTime(e.created_ms))}</small></span>
    <b class="${e.amount_fen < 0 ? "" : "ok"}">${e.amount_fen < 0 ? "-" : "+"}¥${yuan(Math.abs(e.amount_fen))}</b></li>`).join("");
}
function localTime(ms) {
  return new Date(ms).toLocaleString(lang === "zh" ? "zh-CN" : "en-GB", {timeZone: clientConfig.timezone || "Asia/Shanghai", hour12: false});
}
// which way to pay, from where the page runs: inside WeChat (JSAPI), inside Alipay or another phone browser
// (WeChat H5 / Alipay WAP), a computer (a QR code to scan with the phone)
const UA = navigator.userAgent;
const IN_WECHAT = /MicroMessenger/i.test(UA), IN_ALIPAY = /AlipayClient/i.test(UA);
const ON_PHONE = IN_WECHAT || IN_ALIPAY || /Android|iPhone|iPad|Mobile/i.test(UA) || matchMedia("(pointer: coarse)").matches;
function channelFor(m) {
  const want = m.provider === "wechatpay" ? (IN_WECHAT ? ["jsapi", "h5", "native"] : ON_PHONE ? ["h5", "native"] : ["native", "h5"])
    : m.provider === "alipay" ? (ON_PHONE ? ["wap", "precreate"] : ["precreate", "wap"]) : ["page"];
  return want.find((c) => m.channels.includes(c)) || m.channels[0];
}
function usableMethods(methods) {
  // inside WeChat, Alipay's pages cannot open (and the other way round): offer what works where the page is
  return methods.filter((m) => !(IN_WECHAT && m.provider === "alipay") && !(IN_ALIPAY && m.provider === "wechatpay"));
}
function pickedMethod(methods) {
  const saved = localStorage.getItem("tapshare.paymethod");
  const pref = IN_WECHAT ? "wechatpay" : IN_ALIPAY ? "alipay" : saved;
  return methods.find((m) => m.provider === pref) || methods[0];
}
function refundsHtml(refunds) {
  return refunds.map((r) => `<li><span>${t("rs_" + r.state)}<br><small class="muted">${esc(t("m_" + r.provider))} · ${esc(localTime(r.created_ms))}</small></span>
    <b class="${r.state === "success" ? "ok" : ""}">¥${yuan(r.amount_fen)}</b></li>`).join("");
}
async function startTopup(fen, method) {
  const r = await api("POST", "/api/v1/me/topups", {amount_fen: fen, provider: method.provider, channel: channelFor(method),
                                                    return_path: "/app#/wallet?order={order_id}"});
  if (r.pay_kind === "redirect") { location.href = r.pay_url; return; }
  if (r.pay_kind === "qr") {
    const app = t("app_" + r.provider);
    $("#order-state").innerHTML = `<div id="pay-qr" class="qr-box"><p>${esc(t("scan_to_pay", {app}))}</p>${r.qr_svg}
      <p class="muted">¥${yuan(r.amount_fen)} · ${t("qr_expires")}</p></div>`;
    $("#pay-qr").scrollIntoView({block: "nearest"});
    watchOrder(r.order_id);
    return;
  }
  if (r.pay_kind === "jsapi") {
    const invoke = () => window.WeixinJSBridge.invoke("getBrandWCPayRequest", r.jsapi_params, (res) => {
      if (res && res.err_msg === "get_brand_wcpay_request:ok") location.hash = `#/wallet?order=${encodeURIComponent(r.order_id)}`;
      else showError("#topup-error", {code: "pay_cancelled", message: t("pay_cancelled")});
    });
    if (window.WeixinJSBridge) invoke(); else document.addEventListener("WeixinJSBridgeReady", invoke, {once: true});
  }
}
function watchOrder(orderId) {
  const box = $("#order-state"), v = visit();
  every(700, async () => {
    try {
      const o = await api("GET", `/api/v1/me/topups/${encodeURIComponent(orderId)}`);
      if (o.state === "paid") {
        clearTimers();
        // back to the machine the person was standing at, if the visit is still good
        const back = v && Date.now() - v.at < 4.5 * 60_000
          ? `<a class="button" id="continue" href="#/">${esc(t("continue_at", {m: v.machine.machine_id}))}</a>` : "";
        const w2 = await api("GET", "/api/v1/me/wallet");      // the new balance shows with the news, not after
        box.innerHTML = `<p class="ok" id="paid">${t("paid")} ¥${yuan(o.amount_fen)}</p>${back}`;
        $("#available").textContent = `¥${yuan(w2.available_fen)}`;
        $("#entries").innerHTML = entriesHtml(w2.entries);
        renderWithdraw(w2);
      } else if (o.state === "closed") { clearTimers(); box.innerHTML = `<p class="bad">${t("order_closed")}</p>`; }
      else if (o.state === "disputed") { clearTimers(); box.innerHTML = `<p class="bad" id="disputed">${t("order_disputed")}</p>`; }
      else if (!$("#paying") && !$("#pay-qr")) box.innerHTML = `<p class="amber" id="paying">${t("paying")}</p><p class="muted">${t("return_note")}</p>`;
    } catch (e) { clearTimers(); showError(box, e); }
  });
}
// the balance that can go back to the payments it came from, and the refunds on their way
function renderWithdraw(w, done = "") {
  const card = $("#withdraw-card");
  if (!card) return;
  card.innerHTML = `<h2>${t("withdraw_title")}</h2><p class="muted">${t("withdraw_explain")}</p>
    ${w.withdrawable_fen > 0 ? `<button class="secondary" id="withdraw-go">${esc(t("withdraw_go", {amt: yuan(w.withdrawable_fen)}))}</button>`
      : done ? "" : `<p class="muted" id="withdraw-none">${t("withdraw_none")}</p>`}
    <p class="err" id="withdraw-error" role="alert"></p><div id="withdraw-state" aria-live="polite">${done}</div>
    ${w.refunds.length ? `<h3>${t("refunds")}</h3><ul class="list" id="refunds">${refundsHtml(w.refunds)}</ul>` : ""}`;
  const go = $("#withdraw-go");
  if (!go) return;
  go.onclick = async () => {
    const amt = yuan(w.withdrawable_fen);
    if (go.dataset.confirm !== "1") { go.dataset.confirm = "1"; go.textContent = t("withdraw_confirm", {amt}); return; }
    go.disabled = true;
    try {
      const r = await api("POST", "/api/v1/me/withdrawals", {});
      const said = `<p class="ok" id="withdraw-done">${esc(t("withdraw_done", {amt: yuan(r.withdrawn_fen)}))}</p>`
        + (r.kept_fen > 0 ? `<p class="note">${esc(t("withdraw_kept", {amt: yuan(r.kept_fen)}))}</p>` : "");
      const w2 = await api("GET", "/api/v1/me/wallet");
      $("#available").textContent = `¥${yuan(w2.available_fen)}`;
      $("#entries").innerHTML = entriesHtml(w2.entries);
      renderWithdraw(w2, said);
    } catch (e) { go.disabled = false; showError("#withdraw-error", e); }
  };
}
async function walletView(params) {
  if (!token()) { location.hash = "#/login"; return; }
  const w = await api("GET", "/api/v1/me/wallet");
  const amounts = [1000, 2000, 5000, 10000];
  const methods = usableMethods(w.methods);
  let method = pickedMethod(methods);
  render(`<section class="card"><h1>${t("wallet")}</h1>
      <div class="grid"><div class="stat"><span>${t("available")}</span><b id="available">¥${yuan(w.available_fen)}</b></div>
      <div class="stat"><span>${t("held")}</span><b id="held">¥${yuan(w.held_fen)}</b></div></div>
      ${w.held_fen > 0 ? `<p class="note" id="held-note">${esc(t("held_note", {amt: yuan(w.held_fen)}))}</p>` : ""}
      ${w.arrears_fen > 0 ? `<p class="bad" id="arrears">${t("arrears")}: ¥${yuan(w.arrears_fen)}</p>` : ""}
      <div id="order-state" aria-live="polite"></div></section>
    <section class="card"><h2>${t("topup")}</h2>
      ${methods.length > 1 ? `<p class="muted">${t("pay_with")}</p><div class="methods" role="radiogroup" aria-label="${t("pay_with")}">${methods.map((m) =>
        `<button class="secondary method" role="radio" data-provider="${esc(m.provider)}" aria-checked="${m === method}">${t("m_" + m.provider)}${m.development ? `<small>${t("m_dev")}</small>` : ""}</button>`).join("")}</div>` : ""}
      <div class="amounts">${amounts.map((a) => `<button class="secondary amt" data-fen="${a}">¥${a / 100}</button>`).join("")}</div>
      <p class="err" id="topup-error" role="alert"></p>${w.sandbox ? `<p class="muted">${t(devBannerKey())}</p>` : ""}</section>
    <section class="card" id="withdraw-card"></section>
    <section class="card"><h2>${t("history")}</h2><ul class="list" id="entries">${entriesHtml(w.entries)}</ul></section>`);
  document.querySelectorAll("button.method").forEach((b) => { b.onclick = () => {
    method = methods.find((m) => m.provider === b.dataset.provider);
    localStorage.setItem("tapshare.paymethod", method.provider);
    document.querySelectorAll("button.method").forEach((x) => x.setAttribute("aria-checked", String(x === b)));
  }; });
  const pay = async (fen) => {
    try { await startTopup(fen, method); }
    catch (e) {
      if (e.code === "payer_unknown") {       // WeChat tells us who pays once, then comes back here and goes on
        const link = await api("POST", "/api/v1/me/payer-link", {provider: method.provider, resume_fen: fen});
        location.href = link.url; return;
      }
      showError("#topup-error", e);
    }
  };
  document.querySelectorAll("button.amt").forEach((b) => { b.onclick = () => pay(Number(b.dataset.fen)); });
  renderWithdraw(w);
  if (params.get("payer") === "refused") showError("#topup-error", {code: "payer_refused", message: t("payer_refused")});
  else if (params.get("resume") && method && method.provider === "wechatpay") pay(Number(params.get("resume")));
  const orderId = params.get("order");
  if (orderId) watchOrder(orderId);
}

// ---------------------------------------------------------------- live session
function sessionView(id) {
  render(`<section class="card" id="live"><h1>${t("session")}</h1><div id="live-body"><p>${t("waiting_valve")}</p></div>
    <p class="err" id="live-error" role="alert"></p></section>`);
  announce(t("waiting_valve"));
  let stopping = false, built = false;
  every(500, async () => {
    let s;
    try { s = await api("GET", `/api/v1/sessions/${encodeURIComponent(id)}`); } catch (e) { showError("#live-error", e); return; }
    const body = $("#live-body"); if (!body) return;
    $("#live-error").textContent = "";
    if (s.state === "voided") {
      clearTimers(); body.innerHTML = `<p class="big ok">¥0.00</p><p id="voided">${t("voided")}</p><a class="button" href="#/">${t("back")}</a>`;
      announce(t("voided")); return;
    }
    if (s.state === "ended" && s.bill) {
      clearTimers(); $("#live h1").textContent = t("bill");
      body.innerHTML = `<h2>${t("ended")}</h2>` + billHtml(s.bill) + `<a class="button" href="#/">${t("back")}</a>`;
      announce(`${t("ended")}: ¥${yuan(s.bill.amount_fen)}`); refreshRunning(false); return;
    }
    if (s.state === "ended") return;       // the report is on its way
    if (s.state === "starting" || !s.progress) return;
    const p = s.progress, pct = Math.min(100, Math.round(100 * p.cost_fen / Math.max(1, s.credit_limit_fen)));
    if (!built) {              // built once, then only the numbers change: a screen reader is not re-read every 500 ms
      built = true;
      announce(t("session"));
      body.innerHTML = `<div class="grid"><div class="stat"><span>${t("volume")}</span><b class="big" id="vol"></b><span>${t("litre")}</span></div>
        <div class="stat"><span>${t("cost")}</span><b class="big" id="cost"></b><span>${t("yuan")}</span></div>
        <div class="stat"><span>${t("flow")}</span><b id="flow"></b><span>${t("ml_per_min")}</span></div>
        <div class="stat"><span>${t("remaining")}</span><b id="left"></b></div></div>
        <div class="bar" role="presentation"><div id="bar-fill"></div></div>
        <p class="note" id="press-stop">${t("press_stop")}</p>
        <button class="danger" id="stop">${t("stop_phone")}</button>`;
      $("#stop").onclick = async () => {
        stopping = true; $("#stop").disabled = true; $("#stop").textContent = t("stopping"); announce(t("stopping"));
        try { await api("POST", `/api/v1/sessions/${encodeURIComponent(id)}/stop`); } catch (e) { showError("#live-error", e); }
      };
    }
    $("#vol").textContent = (p.volume_ml / 1000).toFixed(3);
    $("#cost").textContent = yuan(p.cost_fen);
    $("#flow").textContent = String(p.flow_ml_per_min);
    $("#left").textContent = `¥${yuan(Math.max(0, s.credit_limit_fen - p.cost_fen))}`;
    $("#bar-fill").style.width = `${pct}%`;          // CSSOM, not an inline style attribute (CSP)
    if (stopping) $("#stop").disabled = true;
  });
}

// ---------------------------------------------------------------- bills (s6)
function billHtml(b) {
  const wq = b.water_quality || {};
  const mins = Math.floor(b.duration_ms / 60000), secs = Math.floor((b.duration_ms % 60000) / 1000);
  return `<div class="card bill" id="bill"><p class="big">¥${yuan(b.amount_fen)}</p><dl class="kv">
    <dt>${t("time")}</dt><dd>${esc(b.started_local)}</dd>
    <dt>${t("location")}</dt><dd class="wrap" id="bill-location">${esc(b.location || b.machine_id)}</dd>
    <dt>${t("machine")}</dt><dd>${esc(b.machine_id)}</dd>
    <dt>${t("duration")}</dt><dd>${mins ? mins + " " + t("min") + " " : ""}${secs} ${t("s")}</dd>
    <dt>${t("volume")}</dt><dd id="bill-volume">${(b.volume_ml / 1000).toFixed(3)} ${t("litre")}</dd>
    <dt>${t("avg_flow")}</dt><dd>${b.avg_flow_ml_per_min} ${t("ml_per_min")}</dd>
    <dt>${t("price")}</dt><dd>${yuan(b.price_fen_per_l)} ${t("per_l")}</dd>
    <dt>${t("water_temp")}</dt><dd>${wq.temp_start_c == null ? "—" : Number(wq.temp_start_c).toFixed(1) + " °C"}</dd>
    <dt>${t("tds")}</dt><dd>${wq.tds_measured === false || wq.tds_ppm == null ? "—" : wq.tds_ppm + " ppm"}</dd>
    <dt>${t("end_reason")}</dt><dd class="wrap">${esc(t("reason_" + b.end_reason))}</dd>
    <dt>${t("points_earned")}</dt><dd>+${b.points} ${t("points_unit")}</dd>
    ${b.refunded_fen ? `<dt>${t("refunded")}</dt><dd class="ok">¥${yuan(b.refunded_fen)}</dd>` : ""}
  </dl><p class="muted order">${t("order_no")} <span class="mono" id="bill-order">${esc(b.session_id)}</span></p></div>`;
}
async function billsView() {
  if (!token()) { location.hash = "#/login"; return; }
  const r = await api("GET", "/api/v1/me/bills");
  render(`<section class="card"><h1>${t("bills")}</h1>${r.bills.length ? `<ul class="list" id="bill-list">${r.bills.map((b) =>
    `<li><a href="#/bill/${esc(b.session_id)}"><span>${esc(b.started_local)}<br><small class="muted">${(b.volume_ml / 1000).toFixed(3)} ${t("litre")}</small></span><b>¥${yuan(b.amount_fen)}</b></a></li>`).join("")}</ul>` : `<p class="muted">${t("no_bills")}</p>`}</section>`);
}
async function billView(id) {
  const b = await api("GET", `/api/v1/me/bills/${encodeURIComponent(id)}`);
  render(`<h1>${t("bill")}</h1>${billHtml(b)}<a class="button secondary" href="#/bills">${t("bills")}</a>`);
}

// ---------------------------------------------------------------- points and gifts (s6)
async function pointsView(justRedeemed) {
  if (!token()) { location.hash = "#/login"; return; }
  const [pts, gifts, reds] = await Promise.all([api("GET", "/api/v1/me/points"), api("GET", "/api/v1/gifts"),
                                                api("GET", "/api/v1/me/redemptions")]);
  const name = (g) => (lang === "zh" ? g.name_zh : g.name_en);
  const byId = Object.fromEntries(gifts.gifts.map((g) => [g.gift_id, g]));
  render(`<section class="card"><h1>${t("points")}</h1><p class="big" id="points">${pts.points}</p><p class="muted">${t("rule")}: ${lang === "zh" ? "每消费 1 元得 1 积分（不足 1 元不计）" : esc(pts.rule)}</p></section>
    ${justRedeemed ? `<section class="card" id="redeemed" role="status"><h2 class="ok">${t("redeemed")}</h2><p>${esc(name(justRedeemed))}</p>
      <p>${t("pickup")}: <b class="code" id="pickup-code">${esc(justRedeemed.pickup_code)}</b></p>
      <p class="note">${esc(t("pickup_how", {contact: operatorContact()}))}</p></section>` : ""}
    <section class="card"><h2>${t("gifts")}</h2><p class="err" id="redeem-error" role="alert"></p>${gifts.gifts.length ? `<ul class="list gifts">${gifts.gifts.map((g) =>
      `<li><span class="gift-name">${esc(name(g))}<br><small class="muted">${g.points_cost} ${t("points_unit")} · ${t("stock")} ${g.stock}</small></span><span class="act"><button class="secondary redeem" data-gift="${esc(g.gift_id)}" ${pts.points >= g.points_cost && g.stock > 0 ? "" : "disabled"}>${t("redeem")}</button></span></li>`).join("")}</ul>` : `<p class="muted">${t("no_gifts")}</p>`}
      <div id="confirm-box" hidden></div></section>
    <section class="card"><h2>${t("redemptions")}</h2><ul class="list" id="redemptions">${reds.redemptions.map((r) =>
      `<li><span>${esc(name(r))}</span><span class="nowrap">${t("pickup")} <b>${esc(r.pickup_code)}</b></span></li>`).join("")}</ul></section>
    <section class="card"><h2>${t("history")}</h2><ul class="list">${pts.history.map((h) =>
      `<li><span>${h.kind === "earn" ? t("points_earned") : h.kind === "redeem" ? t("points_redeem") : esc(h.note)}</span><b>${h.delta > 0 ? "+" : ""}${h.delta}</b></li>`).join("")}</ul></section>`);
  document.querySelectorAll("button.redeem").forEach((b) => { b.onclick = () => {
    const g = byId[b.dataset.gift];              // a confirm step: points are spent for good
    const box = $("#confirm-box");
    box.hidden = false;
    box.innerHTML = `<p id="confirm-text">${esc(t("gift_confirm", {pts: g.points_cost, name: name(g)}))}</p>
      <button id="confirm-redeem">${t("confirm_redeem")}</button><button class="quiet" id="cancel-redeem">${t("cancel")}</button>`;
    box.scrollIntoView({block: "nearest"});
    $("#confirm-redeem").focus();
    $("#cancel-redeem").onclick = () => { box.hidden = true; box.innerHTML = ""; };
    $("#confirm-redeem").onclick = async () => {
      $("#confirm-redeem").disabled = true;
      const requestId = "web-" + crypto.getRandomValues(new Uint32Array(2)).join("-");
      try {
        const r = await api("POST", `/api/v1/gifts/${encodeURIComponent(g.gift_id)}/redeem`, {request_id: requestId});
        await pointsView(r);
        $("#redeemed").scrollIntoView({block: "start"});
      } catch (e) { showError("#redeem-error", e); box.hidden = true; }
    };
  }; });
}

// ---------------------------------------------------------------- account
async function accountView() {
  if (!token()) { render(`<section class="card"><p>${t("not_logged_in")}</p><a class="button" href="#/login">${t("login")}</a></section>`); return; }
  const [me, idv] = await Promise.all([api("GET", "/api/v1/me"), api("GET", "/api/v1/me/identity")]);
  showRunning(me, false);
  render(`<section class="card"><h1>${t("account")}</h1><dl class="kv">
      <dt>${t("phone")}</dt><dd>${esc(me.phone_masked)}</dd>
      <dt>${t("registration")}</dt><dd id="id-state">${t("state_" + (me.registered ? "verified" : idv.state))}</dd>
      ${idv.number_masked ? `<dt>${t("doc_number")}</dt><dd>${esc(idv.number_masked)}</dd><dt>${t("name_short")}</dt><dd>${esc(idv.name_masked)}</dd>` : ""}
      <dt>${t("balance")}</dt><dd>¥${yuan(me.available_fen)}</dd><dt>${t("points")}</dt><dd>${me.points}</dd></dl>
      ${idv.state === "pending" ? `<p class="note" id="pending-hint">${esc(idv.review_hint[lang])}<br>${t("pending_next")}</p>` : ""}</section>
    <section class="card"><p class="muted">${t("operator")}: ${esc(operatorName())} · ${t("contact")}: ${esc(operatorContact())}</p>
      <p><a href="#/terms">${t("terms")}</a> · <a href="#/privacy">${t("privacy")}</a></p></section>
    <section class="card"><p class="err" id="acct-error" role="alert"></p><button class="secondary" id="logout">${t("logout")}</button>
      ${idv.consent_given ? `<button class="quiet" id="withdraw">${t("withdraw_consent")}</button>` : ""}
      <button class="quiet danger-text" id="delete">${t("delete_account")}</button><div id="delete-box" hidden></div></section>`);
  $("#logout").onclick = async () => { try { await api("POST", "/api/v1/auth/logout"); } catch { /* gone already */ }
    localStorage.removeItem("tapshare.token"); location.hash = "#/"; };
  $("#delete").onclick = () => {
    const box = $("#delete-box"), amt = yuan(Math.max(0, me.available_fen));
    box.hidden = false;
    box.innerHTML = `<p>${t("delete_explain")}</p>
      ${me.available_fen > 0 ? `<p class="note" id="refund-note">${esc(t("delete_refund", {amt, contact: operatorContact()}))}</p>` : ""}
      <button class="danger" id="delete-go">${me.available_fen > 0 ? esc(t("delete_go_refund", {amt})) : t("delete_go")}</button>
      <button class="quiet" id="delete-cancel">${t("cancel")}</button>`;
    box.scrollIntoView({block: "nearest"});
    $("#delete-go").focus();
    $("#delete-cancel").onclick = () => { box.hidden = true; $("#delete").focus(); };
    $("#delete-go").onclick = async () => {
      $("#delete-go").disabled = true;
      try {
        const r = await api("DELETE", "/api/v1/me", {confirm: true, refund_balance: true});   // never forfeits
        localStorage.removeItem("tapshare.token");
        $("#running").hidden = true;
        render(`<section class="card" id="deleted"><p>${r.refund_fen > 0 ? esc(t("deleted_refund", {amt: yuan(r.refund_fen)})) : t("deleted")}</p>
          ${r.manual_refund_fen > 0 ? `<p class="note" id="manual-refund">${esc(t("deleted_manual", {amt: yuan(r.manual_refund_fen), id: r.refund_id}))}</p>` : ""}</section>`);
      } catch (e) { showError("#acct-error", e); if ($("#delete-go")) $("#delete-go").disabled = false; }
    };
  };
  const w = $("#withdraw");
  if (w) w.onclick = async () => {
    if (w.dataset.confirm !== "1") { w.dataset.confirm = "1"; w.textContent = t("withdraw_confirm"); return; }
    w.disabled = true;
    try { await api("DELETE", "/api/v1/me/consent"); accountView(); }
    catch (e) { showError("#acct-error", e); w.disabled = false; }
  };
}

// ---------------------------------------------------------------- router
const TAB_OF = {"": "home", login: "home", consent: "home", register: "home", session: "home", wallet: "wallet",
                bills: "bills", bill: "bills", points: "points", account: "account", terms: "account", privacy: "account"};
async function route(scanError) {
  routeSeq += 1;
  clearTimers();
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  applyChrome(TAB_OF[parts[0] || ""] || "home");
  if (!["", "account"].includes(parts[0] || "")) refreshRunning(parts[0] === "session");
  else if (!token()) $("#running").hidden = true;
  window.scrollTo(0, 0);
  try {
    if (!parts.length) await home(scanError);
    else if (parts[0] === "login") await loginView();
    else if (parts[0] === "terms" || parts[0] === "privacy") policyView(parts[0]);
    else if (parts[0] === "consent") await consentView();
    else if (parts[0] === "register") await registerView();
    else if (parts[0] === "wallet") await walletView(params);
    else if (parts[0] === "session" && parts[1]) sessionView(parts[1]);
    else if (parts[0] === "bills") await billsView();
    else if (parts[0] === "bill" && parts[1]) await billView(parts[1]);
    else if (parts[0] === "points") await pointsView();
    else if (parts[0] === "account") await accountView();
    else await home();
  } catch (e) {
    render(`<section class="card"><p class="err" role="alert">${esc(errText(e))}</p><a class="button" href="#/">${t("back")}</a></section>`);
  }
}

async function boot() {
  $("#lang").onclick = () => { lang = lang === "zh" ? "en" : "zh"; localStorage.setItem("tapshare.lang", lang); route(); };
  try { clientConfig = await api("GET", "/api/v1/client-config"); devMode = clientConfig.development_sms_sink || clientConfig.sandbox_payments; }
  catch { devMode = false; }
  const scanError = await scanFromUrl();
  window.addEventListener("hashchange", () => route());
  route(scanError);
}
boot();
