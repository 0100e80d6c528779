# Ruby's Net::HTTP pointed at tokengate, as the README's "Client recipes" show it. Standard
# library only.
#
# Run by .ci/e2e/clients.sh, which judges the results: each scenario writes $OUT/<id>.txt,
# its first line the HTTP status (or `ERR <what failed>`), the rest the response body.
# TG_BASE is tokengate's listener (base-URL mode), TG_PROXY the same listener as a proxy, API
# the upstream's own URL (what a client calls in proxy mode). The environment starts with no
# proxy variables.
require 'json'
require 'net/http'
require 'uri'

BASE = URI(ENV.fetch('TG_BASE'))
PROXY = URI(ENV.fetch('TG_PROXY'))
API = URI(ENV.fetch('API'))
OUT = ENV.fetch('OUT')

def order(id) = { order: { id: id, items: [1, 2, 3], note: "Zoë's café" } }.to_json

def run(id)
  res = yield
  line = res.code
  body = res.body.to_s
rescue StandardError => e
  line = "ERR #{e.class}: #{e.message}".tr("\n", ' ')
  body = ''
ensure
  File.write(File.join(OUT, "#{id}.txt"), "#{line}\n#{body}")
end

def post(http, path, json)
  http.post(path, json, 'Content-Type' => 'application/json')
end

# Base URL: nil as the proxy address, so no proxy from the environment applies either.
base = Net::HTTP.new(BASE.host, BASE.port, nil)
base.open_timeout = base.read_timeout = 10
run('ruby-base-get') { base.get('/v2/orders?client=ruby-base-get') }
run('ruby-base-post') { post(base, '/echo-body', order('ruby-base-post')) }

proxied = Net::HTTP.new(API.host, API.port, PROXY.host, PROXY.port)
proxied.open_timeout = proxied.read_timeout = 10
run('ruby-proxy-get') { proxied.get('/v2/orders?client=ruby-proxy-get') }
run('ruby-proxy-post') { post(proxied, '/echo-body', order('ruby-proxy-post')) }

# The trap: a proxy from the environment (the default, p_addr = :ENV) is skipped for a
# host that resolves to 127.* or ::1.
ENV['http_proxy'] = PROXY.to_s
from_env = Net::HTTP.new(API.host, API.port)
from_env.open_timeout = from_env.read_timeout = 10
run('ruby-env-loopback-trap') { from_env.get('/v2/orders?client=ruby-env-loopback-trap') }
ENV.delete('http_proxy')

puts "ruby #{RUBY_VERSION}"
