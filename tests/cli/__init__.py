"""Every command as users run it: errors in one line, bad inputs, the graphs users export, image formats (aa_deploy/cli)."""
