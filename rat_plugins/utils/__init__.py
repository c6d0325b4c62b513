"""Small helpers shared by the models, adapters, tools and experiments (plain Python + torch).

One module per concern: :mod:`.atomic` (files written whole or not at all), :mod:`.checkpoint_io`
(weights-only checkpoint reading with errors that name the file and the fix), :mod:`.config_keys`
(unknown-key errors with "did you mean").
"""
