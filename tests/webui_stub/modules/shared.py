"""Stand-in for modules.shared: `opts` (Options semantics), `cmd_opts`, `sd_model`, `walk_files`."""
import os
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, **kwargs):
        self.default = default
        self.label = label
        self.section = section

    def info(self, text):
        return self

    def needs_reload_ui(self):
        return self


class Options:
    """Like the webui's: a value set in `data` wins, else the registered default, else AttributeError."""

    _fields = ("data", "data_labels")

    def __init__(self, data_labels):
        object.__setattr__(self, "data_labels", dict(data_labels))
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items()})

    def __getattr__(self, item):
        if item in Options._fields:
            return object.__getattribute__(self, item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return object.__getattribute__(self, item)

    def __setattr__(self, key, value):
        if key in Options._fields:
            object.__setattr__(self, key, value)
        else:
            self.data[key] = value

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def onchange(self, key, func, call=True):
        pass


options_templates = {
    "sd_lora": OptionInfo("None", "Add network to prompt"),
    "lora_in_memory_limit": OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "lora_functional": OptionInfo(False, "Lora/Networks: use old method"),
    "lora_add_hashes_to_infotext": OptionInfo(True, "Add Lora hashes to infotext"),
    "lora_not_found_warning_console": OptionInfo(False, "Lora not found warning in console"),
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier"),
}

class PromptStyles:
    """Like modules.styles.StyleDatabase: a style's text holds "{prompt}" or is appended with ", "."""

    def __init__(self):
        self.styles = {}  # name → (prompt, negative prompt)

    @staticmethod
    def _merge(style, prompt):
        if "{prompt}" in style:
            return style.replace("{prompt}", prompt)
        return ", ".join(x for x in (prompt.strip(), style.strip()) if x)

    def apply_styles_to_prompt(self, prompt, styles):
        for name in styles:
            prompt = self._merge(self.styles.get(name, ("", ""))[0], prompt)
        return prompt

    def apply_negative_styles_to_prompt(self, prompt, styles):
        for name in styles:
            prompt = self._merge(self.styles.get(name, ("", ""))[1], prompt)
        return prompt


opts = Options(options_templates)
prompt_styles = PromptStyles()
cmd_opts = SimpleNamespace(lora_dir=os.path.join(os.getcwd(), "models", "Lora"), lyco_dir_backcompat=None)
sd_model = None


def walk_files(path, allowed_extensions=None):
    if not path or not os.path.isdir(path):
        return
    for root, _, files in os.walk(path, followlinks=True):
        for name in sorted(files):
            if allowed_extensions and os.path.splitext(name)[1].lower() not in allowed_extensions:
                continue
            yield os.path.join(root, name)
