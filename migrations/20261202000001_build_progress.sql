-- A running build's live progress, written at most every 2 s (documents, chunks, tokens and the
-- embedded and reused counts go in their own columns as they grow). The app's model gains these
-- four nullable fields to show them; a database without them still builds (the worker warns once).
ALTER TABLE orbitpilot_memorybuild ADD COLUMN IF NOT EXISTS documents_expected INTEGER;
ALTER TABLE orbitpilot_memorybuild ADD COLUMN IF NOT EXISTS progress_percent DOUBLE PRECISION;
ALTER TABLE orbitpilot_memorybuild ADD COLUMN IF NOT EXISTS eta_seconds DOUBLE PRECISION;
ALTER TABLE orbitpilot_memorybuild ADD COLUMN IF NOT EXISTS progress_at TIMESTAMPTZ;
