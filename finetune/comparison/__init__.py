"""The comparison report's parts: :mod:`.runs` reads run directories, :mod:`.render` writes the table and plot.

The command and the Hydra callback that use them are in :mod:`finetune.compare`.
"""
