"""Step-level reuse: skip transformer work on denoising steps whose output barely changes."""
