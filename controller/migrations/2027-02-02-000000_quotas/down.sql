DROP TABLE namespace_quotas;
