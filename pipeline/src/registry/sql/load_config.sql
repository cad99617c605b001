SELECT subject, compatibility FROM registry_config
