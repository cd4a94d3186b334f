-- Promotions are the record of each sale; orders the record of each unit sold.
-- Ops and reports query these tables directly: names are part of the contract.

CREATE TABLE promotions (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    stock           BIGINT      NOT NULL CHECK (stock BETWEEN 1 AND 100000000),
    per_user_limit  BIGINT      NOT NULL DEFAULT 1 CHECK (per_user_limit >= 1),
    price_cents     BIGINT      NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    starts_at       TIMESTAMPTZ NOT NULL,
    ends_at         TIMESTAMPTZ NOT NULL,
    require_token   BOOLEAN     NOT NULL DEFAULT false,
    require_captcha BOOLEAN     NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

CREATE TABLE orders (
    -- The id the purchase answered with, minted by the gateway (UUIDv7 text).
    order_id     TEXT        PRIMARY KEY,
    promotion_id BIGINT      NOT NULL REFERENCES promotions (id),
    user_id      BIGINT      NOT NULL,
    -- The buyer's n-th unit of this promotion (1-based): one row per buyer
    -- and purchase, whatever the delivery count of its stream message.
    seq          BIGINT      NOT NULL CHECK (seq >= 1),
    status       TEXT        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'paid', 'cancelled')),
    price_cents  BIGINT      NOT NULL CHECK (price_cents >= 0),
    created_at   TIMESTAMPTZ NOT NULL,
    persisted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    paid_at      TIMESTAMPTZ,
    cancelled_at TIMESTAMPTZ,
    UNIQUE (promotion_id, user_id, seq)
);

CREATE INDEX orders_user_created_idx ON orders (user_id, created_at DESC);
