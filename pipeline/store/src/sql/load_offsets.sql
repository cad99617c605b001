SELECT partition, next_offset FROM sink_offsets WHERE consumer = $1 AND topic = $2
