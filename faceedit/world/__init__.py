"""Synthetic face world: seeded procedural faces with exact attributes, labels and landmarks.

Import from the submodules (this package re-exports nothing, so that the module
`faceedit.world.render` is never shadowed by its function `render`):

    from faceedit.world.attributes import ATTRIBUTES, sample_identities, sample_attributes
    from faceedit.world.render import render, render_batch, paste_into_scene
"""
