"""Stand-in for modules.processing: the bits of a processing object `p` the LoRA path touches."""
from modules import extra_networks


class StableDiffusionProcessing:
    def __init__(self, prompt="", scripts=None, n_iter=1):
        self.prompt = prompt
        self.all_prompts = [prompt]
        self.prompts = [prompt]
        self.seeds = [0]
        self.subseeds = [0]
        self.iteration = 0
        self.scripts = scripts
        self.script_args = ()
        self.extra_generation_params = {}
        self.extra_network_data = {}
        self.disable_extra_networks = False
        self.comments = {}

    def comment(self, text):
        self.comments[text] = 1

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def activate_extra_networks(self):
        """What process_images_inner does for one batch: parse the prompt's tags, then activate."""
        self.parse_extra_network_prompts()
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.extra_network_data)


StableDiffusionProcessingTxt2Img = StableDiffusionProcessing
