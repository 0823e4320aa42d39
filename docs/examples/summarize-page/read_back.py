"""Read remembered page summaries back through Capibara's MCP server, as an agent would.

    python read_back.py http://localhost:8080/mcp "$CAPIBARA_KEY" "what are capybaras?"

Uses the official MCP SDK (`pip install mcp`): connects over streamable HTTP with the API key,
calls the `memory.search` tool on the `pages` collection and prints the hits as JSON
(`[{"text", "url", "score"}, …]`). With a fourth argument, a run id, it also reads the run as
the resource `capibara://runs/<id>` and prints its output under `run`.
"""

import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url, key, query, run_id=None):
    client = httpx2.AsyncClient(headers={"Authorization": "Bearer " + key}, timeout=60)
    async with client:
        async with streamable_http_client(url, http_client=client) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                found = await session.call_tool(
                    "memory.search",
                    {"query": query, "collection": "pages", "k": 3},
                )
                if found.is_error:
                    sys.exit("memory.search failed: " + found.content[0].text)
                hits = [
                    {"text": h["text"], "url": h["metadata"].get("url"), "score": h["score"]}
                    for h in found.structured_content["items"]
                ]
                out = {"hits": hits}
                if run_id:
                    run = await session.read_resource("capibara://runs/" + run_id)
                    out["run"] = json.loads(run.contents[0].text)["output"]
                print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
