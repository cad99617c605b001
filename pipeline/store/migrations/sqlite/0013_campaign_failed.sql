-- Why a campaign's fan-out stopped short (a template that fails on a later page, a segment version
-- deleted mid fan-out): set with finished_at when its launch record is dead-lettered, so the
-- campaign shows `failed` with this reason instead of `sending` forever.
ALTER TABLE campaign_progress ADD COLUMN failed_reason text;
