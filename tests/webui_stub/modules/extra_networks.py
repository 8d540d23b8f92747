"""Stand-in for modules.extra_networks: prompt tags → ExtraNetworkParams → activate → scripts hook."""
import logging
import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


class ExtraNetworkParams:
    """`items` as written; an item splitting into exactly two parts on '=' (max 2 splits) is named."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items

    def __repr__(self):
        return f"ExtraNetworkParams({self.items!r})"


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    res = {}
    for name, args in list(extra_network_data.items()):
        net = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if net is None:
            logging.info(f"Skipping unknown extra network: {name}")
            continue
        res.setdefault(net, []).extend(args)
    return res


def activate(p, extra_network_data):
    activated = []
    for net, args in lookup_extra_networks(extra_network_data).items():
        try:
            net.activate(p, args)
            activated.append(net)
        except Exception as e:
            errors.display(e, f"activating extra network {net.name} with arguments {args}")
    for name, net in extra_network_registry.items():
        if net in activated:
            continue
        try:
            net.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    data = lookup_extra_networks(extra_network_data)
    for net in list(data) + [n for n in extra_network_registry.values() if n not in data]:
        try:
            net.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {net.name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
