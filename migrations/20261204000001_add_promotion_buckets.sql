-- Buckets of a hot promotion (issue 11): the stock is split over `buckets`
-- Redis hash tags, each with its own stock, buyers, results and stream; a
-- buyer always goes to bucket hash(user) mod buckets. 1 is the layout of a
-- promotion before this column existed.
ALTER TABLE promotions
    ADD COLUMN buckets integer NOT NULL DEFAULT 1
    CONSTRAINT promotions_buckets_range CHECK (buckets BETWEEN 1 AND 64);
