"""Every string on the dispenser's screen, Simplified Chinese first, English second. Pure data: no Kivy,
so the tests can check that the shipped font has every glyph used here."""

from __future__ import annotations

LANGUAGES = ("zh", "en")

STRINGS: dict[str, dict[str, str]] = {
    "scan_to_drink": {"zh": "扫码取水", "en": "Scan to drink"},
    "scan_hint": {"zh": "用手机扫描二维码，登录后点【开始取水】",
                  "en": "Scan with your phone, log in, then tap Start"},
    "price": {"zh": "单价", "en": "Price"},
    "yuan_per_l": {"zh": "元/升", "en": "yuan/L"},
    "water_temp": {"zh": "水温", "en": "Water temp."},
    "water_quality": {"zh": "水质", "en": "Water quality"},
    "tds_ok": {"zh": "合格", "en": "good"},
    "tds_high": {"zh": "超标", "en": "too high"},
    "unknown": {"zh": "未知", "en": "unknown"},
    "machine_no": {"zh": "机器编号", "en": "Machine"},
    "lang_button": {"zh": "English", "en": "中文"},
    "dispensing": {"zh": "正在出水", "en": "Dispensing"},
    "volume": {"zh": "水量", "en": "Volume"},
    "litre": {"zh": "升", "en": "L"},
    "cost": {"zh": "金额", "en": "Cost"},
    "yuan": {"zh": "元", "en": "yuan"},
    "remaining": {"zh": "剩余额度", "en": "Credit left"},
    "flow": {"zh": "流速", "en": "Flow"},
    "ml_per_min": {"zh": "毫升/分", "en": "ml/min"},
    "press_stop": {"zh": "取水完毕请按机器上的【停止】按钮", "en": "Press the STOP button on the machine when done"},
    "screen_stop": {"zh": "停止出水", "en": "Stop"},
    "settling": {"zh": "正在结算……", "en": "Settling the bill…"},
    "receipt": {"zh": "本次账单", "en": "Your bill"},
    "time": {"zh": "时间", "en": "Time"},
    "duration": {"zh": "时长", "en": "Duration"},
    "avg_flow": {"zh": "平均流速", "en": "Average flow"},
    "amount": {"zh": "金额", "en": "Amount"},
    "points": {"zh": "获得积分", "en": "Points earned"},
    "touch_to_return": {"zh": "轻触屏幕返回（{s} 秒）", "en": "Touch to return ({s} s)"},
    "thanks": {"zh": "谢谢使用，账单已发送到您的手机", "en": "Thank you. The bill is on your phone too"},
    "seconds": {"zh": "秒", "en": "s"},
    "minutes": {"zh": "分", "en": "min"},
    "offline_title": {"zh": "网络连接中断", "en": "No connection"},
    "offline_body": {"zh": "暂时无法扫码取水，恢复连接后自动可用。",
                     "en": "Scanning is paused until the connection returns."},
    "out_of_service": {"zh": "暂停服务", "en": "Out of service"},
    "support": {"zh": "如需帮助，请联系客服并告知机器编号", "en": "For help, call support and give the machine number"},
    "support_hotline": {"zh": "如需帮助，请拨打客服电话 {number}，并告知机器编号",
                        "en": "For help, call {number} and give the machine number"},
    # why a start was refused, in words, for the person at the machine (shown 10 s)
    "rej_busy": {"zh": "本机正在为他人服务", "en": "the machine is serving someone else"},
    "rej_out_of_service": {"zh": "本机暂停服务", "en": "the machine is out of service"},
    "rej_maintenance": {"zh": "本机正在维护", "en": "the machine is being serviced"},
    "rej_offline": {"zh": "本机暂时无法联网", "en": "the machine is offline"},
    "rej_expired": {"zh": "请求已超时，请重新扫码", "en": "the request timed out; scan again"},
    "rej_insufficient_credit": {"zh": "余额不足，请先充值", "en": "your balance is too low; top up first"},
    "rej_price_changed": {"zh": "价格刚刚更新，请重新扫码确认", "en": "the price has just changed; scan again"},
    "rej_other": {"zh": "请重新扫码", "en": "please scan again"},
    "maintenance_title": {"zh": "维护中", "en": "Maintenance"},
    "maintenance_body": {"zh": "技术人员正在维护本机，请稍候。", "en": "A technician is working on this machine."},
    "sim_panel": {"zh": "模拟硬件", "en": "Simulated hardware"},
    "sim_stop": {"zh": "实体停止按钮（S 键）", "en": "Machine STOP button (S key)"},
    "phone_link": {"zh": "手机链接", "en": "Phone link"},
    "rejected": {"zh": "未能开始：{why}", "en": "Could not start: {why}"},
    # maintenance (technicians)
    "pin_title": {"zh": "维护登录", "en": "Maintenance login"},
    "pin_hint": {"zh": "请输入维护密码", "en": "Enter the maintenance PIN"},
    "pin_wrong": {"zh": "密码错误，还可尝试 {n} 次", "en": "Wrong PIN: {n} tries left"},
    "pin_locked": {"zh": "错误次数过多，请 {s} 秒后再试", "en": "Too many wrong PINs: try again in {s} s"},
    "pin_not_set": {"zh": "尚未设置维护密码（部署时设置）", "en": "No maintenance PIN is set (deploy sets it)"},
    "pin_refused": {"zh": "正在服务用户，无法进入维护", "en": "A customer is being served: try later"},
    "ok": {"zh": "确定", "en": "OK"},
    "cancel": {"zh": "取消", "en": "Cancel"},
    "m_calibrate": {"zh": "流量校准", "en": "Calibrate"},
    "m_flush": {"zh": "冲洗/阀门", "en": "Flush/valve"},
    "m_sensors": {"zh": "传感器", "en": "Sensors"},
    "m_sync": {"zh": "云端同步", "en": "Sync"},
    "m_consumables": {"zh": "耗材", "en": "Consumables"},
    "m_faults": {"zh": "故障", "en": "Faults"},
    "m_info": {"zh": "本机信息", "en": "Machine"},
    "m_exit": {"zh": "退出维护", "en": "Exit"},
    "cal_target": {"zh": "目标水量（毫升）", "en": "Target (ml)"},
    "cal_pour": {"zh": "出水到量杯", "en": "Pour into the jug"},
    "cal_measured": {"zh": "量杯读数（毫升）", "en": "Jug reading (ml)"},
    "cal_record": {"zh": "记录读数", "en": "Record reading"},
    "cal_pours": {"zh": "已记录 {n} 次（至少 3 次）", "en": "{n} pours recorded (at least 3)"},
    "cal_result": {"zh": "新系数 {new}（原 {old}），偏差 {spread}%，变化 {change}%",
                   "en": "New factor {new} (was {old}), spread {spread}%, change {change}%"},
    "cal_accept": {"zh": "采用新系数", "en": "Accept"},
    "cal_discard": {"zh": "放弃", "en": "Discard"},
    "cal_factor": {"zh": "当前系数（脉冲/升）", "en": "Factor now (pulses/L)"},
    "pouring": {"zh": "出水中：{ml} 毫升，{s} 秒", "en": "Pouring: {ml} ml, {s} s"},
    "last_pour": {"zh": "上次：{ml} 毫升（{p} 脉冲，{s} 秒，{why}）", "en": "Last: {ml} ml ({p} pulses, {s} s, {why})"},
    "stop": {"zh": "停止", "en": "Stop"},
    "flush_for": {"zh": "冲洗 {s} 秒", "en": "Flush {s} s"},
    "valve_test": {"zh": "阀门测试 3 秒", "en": "Valve test 3 s"},
    "flush_due": {"zh": "已超过冲洗周期 {d} 天，请冲洗管路", "en": "Flushing is {d} days overdue"},
    "flush_ok": {"zh": "冲洗周期内", "en": "Flushing is up to date"},
    "valve": {"zh": "阀门", "en": "Valve"},
    "open": {"zh": "开", "en": "open"},
    "closed": {"zh": "关", "en": "closed"},
    "online_yes": {"zh": "在线", "en": "online"},
    "online_no": {"zh": "离线", "en": "offline"},
    "pending": {"zh": "待上报", "en": "Waiting to send"},
    "dead": {"zh": "上报失败", "en": "Dead letters"},
    "last_contact": {"zh": "上次联系", "en": "Last contact"},
    "retry": {"zh": "重试", "en": "Retry"},
    "discard": {"zh": "丢弃", "en": "Discard"},
    "confirm_discard": {"zh": "确认丢弃", "en": "Confirm discard"},
    "replace": {"zh": "已更换", "en": "Replaced"},
    "confirm_replace": {"zh": "确认已更换", "en": "Confirm replaced"},
    "c_filter": {"zh": "滤芯", "en": "Filter"},
    "c_uv_lamp": {"zh": "紫外灯", "en": "UV lamp"},
    "c_usage": {"zh": "{l} 升 / {d} 天（{pct}%）", "en": "{l} L / {d} days ({pct}%)"},
    "c_warn": {"zh": "即将到期，请准备更换", "en": "Nearly used up: replace soon"},
    "clear": {"zh": "解除", "en": "Clear"},
    "no_lockouts": {"zh": "无故障锁定", "en": "No lockouts"},
    "take_out": {"zh": "暂停服务", "en": "Out of service"},
    "put_back": {"zh": "恢复服务", "en": "Back in service"},
    "event_log": {"zh": "事件记录", "en": "Event log"},
    "info_version": {"zh": "软件版本", "en": "Software"},
    "info_ip": {"zh": "IP 地址", "en": "IP address"},
    "info_boot": {"zh": "启动序号", "en": "Boot"},
    "info_uptime": {"zh": "运行时间", "en": "Uptime"},
    "info_disk": {"zh": "剩余磁盘", "en": "Disk free"},
    "auto_exit": {"zh": "{s} 秒无操作将自动退出", "en": "Leaves by itself after {s} s untouched"},
    # why a machine is out of service, in words a person at the machine understands
    "lock_leak_sensor": {"zh": "检测到漏水，需工作人员现场处理",
                         "en": "A leak was detected: staff must check the machine"},
    "lock_ghost_flow": {"zh": "检测到异常水流，已关闭出水", "en": "Water flowed when it should not: the valve is shut"},
    "lock_operator": {"zh": "运营人员已暂停本机", "en": "Paused by the operator"},
    "lock_temperature": {"zh": "水温异常，暂停供水", "en": "Water temperature out of range"},
    "lock_tds": {"zh": "水质检测超标，暂停供水", "en": "Water quality out of limits"},
    "lock_low_water": {"zh": "水箱水量不足", "en": "The tank is nearly empty"},
    "lock_fault": {"zh": "设备故障，已关闭出水", "en": "A machine fault: the valve is shut"},
    "lock_fault_storage": {"zh": "存储故障：记录无法写入，已关闭出水",
                           "en": "Storage fault: records cannot be written"},
    "lock_fault_valve": {"zh": "阀门故障，已关闭出水", "en": "Valve fault: the valve is shut"},
    "lock_fault_flow_meter": {"zh": "流量计故障，已关闭出水", "en": "Flow meter fault: the valve is shut"},
    "lock_fault_sync": {"zh": "与云端同步的程序反复出错", "en": "The link to the cloud keeps failing"},
    "lock_fault_internal": {"zh": "软件内部错误，已关闭出水", "en": "Internal software error: the valve is shut"},
    "clear_refused_disk": {"zh": "未能解除：磁盘已满，请先清理空间",
                           "en": "Not cleared: the disk is full, free space first"},
    "clear_refused": {"zh": "未能解除：存储仍无法写入", "en": "Not cleared: storage still cannot be written"},
    # why a technician's pour ended
    "pour_end_target": {"zh": "已达目标", "en": "target reached"},
    "pour_end_max_time": {"zh": "已达最长时间", "en": "time limit"},
    "pour_end_max_volume": {"zh": "已达最大水量", "en": "volume limit"},
    "pour_end_stopped": {"zh": "已停止", "en": "stopped"},
    "pour_end_exit": {"zh": "退出维护", "en": "left maintenance"},
    "pour_end_fault": {"zh": "故障", "en": "fault"},
    "pour_end_shutdown": {"zh": "关机", "en": "shutdown"},
    "pour_end_not_started": {"zh": "未能开始（记录无法写入）", "en": "not started (records cannot be written)"},
    "lock_other": {"zh": "设备暂停使用", "en": "Temporarily unavailable"},
    # end reasons on the receipt
    "reason_stop_button": {"zh": "按下停止按钮", "en": "Stop button"},
    "reason_screen_stop": {"zh": "屏幕停止", "en": "Screen stop"},
    "reason_phone_stop": {"zh": "手机停止", "en": "Phone stop"},
    "reason_credit_exhausted": {"zh": "额度用完", "en": "Credit used up"},
    "reason_max_volume": {"zh": "达到单次上限", "en": "Volume limit"},
    "reason_max_duration": {"zh": "达到最长时间", "en": "Time limit"},
    "reason_idle": {"zh": "长时间无水流", "en": "No flow"},
    "reason_cancelled": {"zh": "已取消", "en": "Cancelled"},
    "reason_fault": {"zh": "设备故障", "en": "Machine fault"},
    "reason_leak": {"zh": "检测到漏水", "en": "Leak detected"},
    "reason_shutdown": {"zh": "设备关机", "en": "Machine shut down"},
    "reason_power_loss": {"zh": "断电", "en": "Power loss"},
    "reason_other": {"zh": "已结束", "en": "Ended"},
}


def tr(key: str, lang: str, **fmt: object) -> str:
    entry = STRINGS.get(key)
    if entry is None:
        return key
    text = entry.get(lang) or entry["zh"]
    return text.format(**fmt) if fmt else text


def lockout_text(reason: str, lang: str) -> str:
    if reason.startswith("fault:"):
        key = "lock_fault_" + reason.split(":", 1)[1]
        return tr(key if key in STRINGS else "lock_fault", lang)
    key = f"lock_{reason}"
    return tr(key if key in STRINGS else "lock_other", lang)


def clear_refusal_text(why: str, lang: str) -> str:
    """Why clearing a lockout on site was refused, in a line (the whole reason is in the event log)."""
    return tr("clear_refused_disk" if "free" in why else "clear_refused", lang)


def reason_text(reason: str, lang: str) -> str:
    key = f"reason_{reason}"
    return tr(key if key in STRINGS else "reason_other", lang)


def all_text() -> str:
    """Every character the screen can show from this table (for the font-coverage test)."""
    return "".join(v for entry in STRINGS.values() for v in entry.values())
