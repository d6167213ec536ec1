"""`cai studio CONSTITUTION`: a constitution workbench in the browser (cai.studio.app).

The constitution as editable cards, the file on disk the source of truth (cai.studio.state, cai.studio.edits);
what the judge makes of it on one prompt and against people's labels, re-asking only what an edit changed
(cai.studio.judging).
"""
