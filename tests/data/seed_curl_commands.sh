# The chat curl commands of the provider docs the API copies (spec/api.md, section 2), as
# written there; only the host is a placeholder, which the test replaces with the server.

# from the provider's docs (openai-chat-api-mythomax), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \
  -d '{
      "model": "Gryphe/MythoMax-L2-13b",
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }'

# from the provider's docs (openai-chat-api-mythomax), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \
  -d '{
      "model": "Gryphe/MythoMax-L2-13b",
      "messages": [
        {
            "role": "system",
            "content": "Respond like a michelin starred chef."
        },
        {
          "role": "user",
          "content": "Can you name at least two different techniques to cook lamb?"
        },
        {
          "role": "assistant",
          "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'"'"'m more than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender textures of this majestic protein. First, we have the classic \"Sous Vide\" method. Next, we have the ancient art of \"Sous le Sable\". And finally, we have the more modern technique of \"Hot Smoking.\""
        },
        {
          "role": "user",
          "content": "Tell me more about the second method."
        }
      ]
    }'

# from the provider's docs (openai-chat-api-mythomax), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \
  -d '{
      "model": "Gryphe/MythoMax-L2-13b",
      "stream": true,
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }'

# from the provider's docs (openai-chat-api-yi34b), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \
-d '{
"model": "01-ai/Yi-34B-Chat",
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'

# from the provider's docs (openai-chat-api-yi34b), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \
-d '{
"model": "01-ai/Yi-34B-Chat",
"messages": [
{
"role": "system",
"content": "Respond like a michelin starred chef."
},
{
"role": "user",
"content": "Can you name at least two different techniques to cook lamb?"
},
{
"role": "assistant",
"content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'"'"'m more than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender textures of this majestic protein. First, we have the classic \"Sous Vide\" method. Next, we have the ancient art of \"Sous le Sable\". And finally, we have the more modern technique of \"Hot Smoking.\""
},
{
"role": "user",
"content": "Tell me more about the second method."
}
]
}'

# from the provider's docs (openai-chat-api-yi34b), verbatim
curl "https://provider.example/v1/openai/chat/completions" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \
-d '{
"model": "01-ai/Yi-34B-Chat",
"stream": true,
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'
