"""Stand-in for modules.script_callbacks: registrations are recorded in `callback_map`."""
from collections import defaultdict

callback_map: dict[str, list] = defaultdict(list)


def _add(kind, fn):
    callback_map[kind].append(fn)


def on_model_loaded(fn): _add("model_loaded", fn)
def on_script_unloaded(fn): _add("script_unloaded", fn)
def on_before_ui(fn): _add("before_ui", fn)
def on_ui_tabs(fn): _add("ui_tabs", fn)
def on_ui_settings(fn): _add("ui_settings", fn)
def on_app_started(fn): _add("app_started", fn)
def on_infotext_pasted(fn): _add("infotext_pasted", fn)


def script_unloaded_callback():
    for fn in list(callback_map["script_unloaded"]):
        fn()
