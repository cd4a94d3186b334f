-- Accounts for buyers who log in with a password (POST /api/register,
-- /api/login, `seckill user add`). The JWT the login issues carries the id as
-- `sub`, like the tokens of an outside identity provider, so account ids
-- start far above the ids such providers and the load tests use.

CREATE TABLE users (
    id            BIGINT      GENERATED ALWAYS AS IDENTITY (START WITH 1000000000) PRIMARY KEY,
    username      TEXT        NOT NULL UNIQUE
                              CHECK (username ~ '^[a-z0-9_.-]{3,64}$'),
    -- Argon2id, PHC string format ($argon2id$v=19$m=…,t=…,p=…$salt$hash).
    password_hash TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
