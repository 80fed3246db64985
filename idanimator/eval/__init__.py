"""Measuring generated videos the way the field reports them: identity, prompt following and motion.

``python -m idanimator eval --videos DIR --faces DIR --out DIR`` pairs each video with its reference photo
and prompt (:mod:`.pairing`), computes the metrics of ConsisID's released evaluation protocol
(:mod:`.identity` with the embedders of :mod:`.embedders`, :mod:`.clipmetrics`, :mod:`.motion`) and writes
``summary.json``, a Markdown table and plots (:mod:`.report`); :mod:`.metrics` names the metrics and
:mod:`.runner` ties them together. ``generate``'s batch mode, which writes exactly the layout ``eval`` reads,
is :mod:`idanimator.batch`.

This package file imports nothing, so importing one part never loads the others.
"""
