"""Stand-in for modules.processing: the parts of `p` and of process_images the LoRA path touches.

`process_images(p, sample)` follows process_images / process_images_inner / the txt2img hires
pass in the order that matters to extra networks: scripts' before_process; setup_prompts (styles
applied to prompt and hires prompt lists); scripts' process; per batch: the batch's prompts,
before_process_batch, parse_extra_network_prompts (prompt and hires prompt), activate (→
after_extra_networks_activate), the first pass, then with hires fix `is_hr_pass` = True, activate
the hires networks, the second pass. `sample(p)` stands for a pass (the model's forward). The
infotext parameters are snapshotted after each batch, as the webui writes them then.
"""
from modules import extra_networks, shared


class StableDiffusionProcessing:
    def __init__(self, prompt="", scripts=None, n_iter=1, batch_size=1, negative_prompt="", styles=None):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.styles = list(styles or [])
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.all_prompts = [prompt]
        self.prompts = [prompt]
        self.main_prompt = prompt
        self.seeds = [0]
        self.subseeds = [0]
        self.iteration = 0
        self.scripts = scripts
        self.script_args = ()
        self.extra_generation_params = {}
        self.extra_network_data = {}
        self.disable_extra_networks = False
        self.is_hr_pass = False
        self.comments = {}
        self.infotexts = []

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        if isinstance(self.prompt, list):
            self.all_prompts = list(self.prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = list(self.negative_prompt)
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.all_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, self.styles) for x in self.all_prompts]
        self.all_negative_prompts = [shared.prompt_styles.apply_negative_styles_to_prompt(x, self.styles)
                                     for x in self.all_negative_prompts]
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def activate_extra_networks(self):
        """One batch's first pass without the rest of process_images: parse the tags, activate."""
        self.parse_extra_network_prompts()
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.extra_network_data)

    def sample(self, sample):
        sample(self)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, prompt="", scripts=None, enable_hr=False, hr_prompt="", **kwargs):
        super().__init__(prompt, scripts, **kwargs)
        self.enable_hr = enable_hr
        self.hr_prompt = hr_prompt
        self.hr_extra_network_data = {}

    def setup_prompts(self):
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == "":
            self.hr_prompt = self.prompt
        if isinstance(self.hr_prompt, list):
            self.all_hr_prompts = list(self.hr_prompt)
        else:
            self.all_hr_prompts = self.batch_size * self.n_iter * [self.hr_prompt]
        self.all_hr_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, self.styles) for x in self.all_hr_prompts]

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        if self.enable_hr:
            n, size = self.iteration, self.batch_size
            self.hr_prompts = self.all_hr_prompts[n * size:(n + 1) * size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def sample(self, sample):
        sample(self)
        if not self.enable_hr:
            return
        self.is_hr_pass = True
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        sample(self)
        self.is_hr_pass = False


def process_images(p, sample):
    """The LoRA-relevant skeleton of process_images (see the module doc); returns p."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.setup_prompts()
    p.seeds = p.subseeds = [0] * p.batch_size
    if p.scripts is not None:
        p.scripts.process(p)
    for n in range(p.n_iter):
        p.iteration = n
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.parse_extra_network_prompts()
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.sample(sample)
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]  # the infotext shows the full prompts
        p.infotexts.append({"Prompt": list(p.prompts), **p.extra_generation_params})
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    return p
