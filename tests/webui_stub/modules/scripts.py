"""Stand-in for modules.scripts: the Script base class and the always-on runner callback."""
from modules import errors

AlwaysVisible = object()


class Script:
    filename = None
    args_from = 0
    args_to = 0
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """Holds always-on scripts; like the webui, it catches and reports what a script raises."""

    def __init__(self, scripts=()):
        self.alwayson_scripts = []
        for s in scripts:
            if s.show(False) is AlwaysVisible:
                s.alwayson = True
                self.alwayson_scripts.append(s)

    def _run(self, method, p, **kwargs):
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method)(p, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._run("after_extra_networks_activate", p, **kwargs)
