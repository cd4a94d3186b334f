-- A cancelled or expired order gives its unit back to Redis through
-- lua/restock.lua. restocked_at records that the unit is back, so a crash
-- between the cancel and the restock is finished later by the sweeper, and
-- no cancelled unit stays unsold.
ALTER TABLE orders ADD COLUMN restocked_at TIMESTAMPTZ;

-- The payment-timeout sweeper scans pending orders by age.
CREATE INDEX orders_pending_created_idx ON orders (created_at) WHERE status = 'pending';

-- Cancelled orders whose unit is not back yet (normally none).
CREATE INDEX orders_restock_due_idx ON orders (cancelled_at)
    WHERE status = 'cancelled' AND restocked_at IS NULL;

-- Stats and reconcile count a promotion's orders by status.
CREATE INDEX orders_promotion_status_idx ON orders (promotion_id, status);
