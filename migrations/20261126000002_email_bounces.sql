-- Not Django's: addresses an SMTP server refused for good (5xx), so the app can tell the user and
-- stop sending. One row per refusal.
CREATE TABLE IF NOT EXISTS orbitworker_emailbounce (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT REFERENCES accounts_user (id) ON DELETE CASCADE,
    email VARCHAR(254) NOT NULL,
    smtp_code INTEGER,
    message TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orbitworker_emailbounce_email ON orbitworker_emailbounce (email);
