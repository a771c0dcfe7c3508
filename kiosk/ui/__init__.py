"""The dispenser's touchscreen UI (Kivy): one module per screen with its .kv file beside it. Only this
package imports Kivy; it reads the core's snapshots on Kivy's clock and sends events through the runtime,
so no widget is touched from another thread."""
