"""Analysis apps on top of core and attacks: loss landscapes, the 1-D toy, sweep summaries and
attack reports."""
