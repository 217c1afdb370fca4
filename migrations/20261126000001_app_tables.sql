-- The OrbitingFox tables orbit-worker reads and writes, named as Django names them
-- (<app>_<model>, many-to-many as <app>_<model>_<field>). On a database Django already manages,
-- every statement is a no-op (IF NOT EXISTS); docs/schema.md maps each column to its use.

CREATE TABLE IF NOT EXISTS accounts_user (
    id BIGSERIAL PRIMARY KEY,
    username VARCHAR(150) NOT NULL UNIQUE,
    email VARCHAR(254) NOT NULL DEFAULT '',
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    date_joined TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS messaging_conversation (
    id BIGSERIAL PRIMARY KEY,
    title VARCHAR(255) NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS messaging_conversation_participants (
    id BIGSERIAL PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES messaging_conversation (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    UNIQUE (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS messaging_conversation_participants_user
    ON messaging_conversation_participants (user_id);

CREATE TABLE IF NOT EXISTS messaging_message (
    id BIGSERIAL PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES messaging_conversation (id) ON DELETE CASCADE,
    sender_id BIGINT REFERENCES accounts_user (id) ON DELETE SET NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    edited_at TIMESTAMPTZ,
    is_deleted BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS messaging_message_conversation
    ON messaging_message (conversation_id, created_at);
CREATE INDEX IF NOT EXISTS messaging_message_sender ON messaging_message (sender_id);

CREATE TABLE IF NOT EXISTS channels_channel (
    id BIGSERIAL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS channels_channel_members (
    id BIGSERIAL PRIMARY KEY,
    channel_id BIGINT NOT NULL REFERENCES channels_channel (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    UNIQUE (channel_id, user_id)
);
CREATE INDEX IF NOT EXISTS channels_channel_members_user ON channels_channel_members (user_id);

CREATE TABLE IF NOT EXISTS channels_channelpost (
    id BIGSERIAL PRIMARY KEY,
    channel_id BIGINT NOT NULL REFERENCES channels_channel (id) ON DELETE CASCADE,
    author_id BIGINT REFERENCES accounts_user (id) ON DELETE SET NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS channels_channelpost_channel ON channels_channelpost (channel_id, created_at);

CREATE TABLE IF NOT EXISTS groups_group (
    id BIGSERIAL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS groups_group_members (
    id BIGSERIAL PRIMARY KEY,
    group_id BIGINT NOT NULL REFERENCES groups_group (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    UNIQUE (group_id, user_id)
);
CREATE INDEX IF NOT EXISTS groups_group_members_user ON groups_group_members (user_id);

CREATE TABLE IF NOT EXISTS groups_grouppost (
    id BIGSERIAL PRIMARY KEY,
    group_id BIGINT NOT NULL REFERENCES groups_group (id) ON DELETE CASCADE,
    author_id BIGINT REFERENCES accounts_user (id) ON DELETE SET NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS groups_grouppost_group ON groups_grouppost (group_id, created_at);

CREATE TABLE IF NOT EXISTS blink_blinkaudio (
    id BIGSERIAL PRIMARY KEY,
    owner_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    title VARCHAR(255) NOT NULL DEFAULT '',
    -- A path under MEDIA_ROOT, or an http(s) URL.
    audio_file VARCHAR(1024) NOT NULL DEFAULT '',
    duration_seconds DOUBLE PRECISION,
    transcription_status VARCHAR(20) NOT NULL DEFAULT 'pending',
    transcript TEXT NOT NULL DEFAULT '',
    transcript_segments JSONB,
    transcript_language VARCHAR(32) NOT NULL DEFAULT '',
    transcription_error TEXT NOT NULL DEFAULT '',
    ai_analysis_status VARCHAR(20) NOT NULL DEFAULT 'pending',
    summary TEXT NOT NULL DEFAULT '',
    action_items JSONB,
    sentiment VARCHAR(20) NOT NULL DEFAULT '',
    speaker_count INTEGER,
    ai_analysis_error TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS blink_blinkaudio_owner ON blink_blinkaudio (owner_id);

CREATE TABLE IF NOT EXISTS orbitpilot_note (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    title VARCHAR(255) NOT NULL DEFAULT '',
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orbitpilot_note_user ON orbitpilot_note (user_id);

CREATE TABLE IF NOT EXISTS orbitpilot_memorybuild (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    -- planned | running | completed | failed | coalesced
    status VARCHAR(20) NOT NULL DEFAULT 'planned',
    task_id VARCHAR(255) NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    documents INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    chunks_reused INTEGER NOT NULL DEFAULT 0,
    chunks_embedded INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NOT NULL DEFAULT '',
    -- A request that arrived while another build of the user ran points at that build.
    coalesced_into_id BIGINT REFERENCES orbitpilot_memorybuild (id) ON DELETE SET NULL,
    -- The lock's fencing token of the run that last wrote this row.
    fence_token BIGINT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS orbitpilot_memorybuild_user ON orbitpilot_memorybuild (user_id, created_at);

CREATE TABLE IF NOT EXISTS orbitpilot_aiusagelog (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT REFERENCES accounts_user (id) ON DELETE SET NULL,
    -- orbitpilot_answer | orbitpilot_embed | blink_transcription | blink_analysis
    feature VARCHAR(50) NOT NULL,
    model VARCHAR(100) NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    audio_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_usd NUMERIC(12, 6) NOT NULL DEFAULT 0,
    task_id VARCHAR(255) NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orbitpilot_aiusagelog_user ON orbitpilot_aiusagelog (user_id, created_at);

CREATE TABLE IF NOT EXISTS notifications_pushsubscription (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES accounts_user (id) ON DELETE CASCADE,
    endpoint TEXT NOT NULL UNIQUE,
    p256dh VARCHAR(255) NOT NULL,
    auth VARCHAR(255) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS notifications_pushsubscription_user
    ON notifications_pushsubscription (user_id);

-- Not Django's: where `orbit-worker db seed` remembers which row each corpus line became, so a
-- second seed of the same corpus updates instead of duplicating.
CREATE TABLE IF NOT EXISTS orbitworker_seedmap (
    source_key TEXT PRIMARY KEY,
    row_id BIGINT NOT NULL
);
