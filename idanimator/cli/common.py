"""What every command's parser shares."""

from __future__ import annotations

import argparse

DETECTORS = ["auto", "insightface", "retinaface"]


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the empty ones (a required flag's None, an off switch's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or not action.help:
            return action.help
        return super()._get_help_string(action)
