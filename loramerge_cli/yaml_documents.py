"""YAML as the recipes and task specs read it: YAML's safe subset, and a key given twice in one mapping is an
error (PyYAML keeps the last one without a word)."""

from __future__ import annotations

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a repeated key."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be set again here
                continue
            if isinstance(key_node, yaml.ScalarNode):  # keys as written: `a` and `'a'` are one key
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        """A value PyYAML cannot build (a 13th month, an integer of over 4,300 digits) is a YAML error at its
        line, as a syntax error is, not a ValueError out of the parser."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as error:
            raise yaml.constructor.ConstructorError(None, None, str(error), node.start_mark) from None


def load_yaml(text: str):
    """The document in `text` (safe types only), refusing a key given twice."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(error: yaml.YAMLError) -> str:
    """' at line N: what is wrong' (or less, where PyYAML knows less) for a one-line message."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    return (f" at line {mark.line + 1}" if mark is not None else "") + (f": {problem}" if problem else "")
